"""Exp.5's reward models (SPEC.md 6.3): a per-fact classifier, trained on facts labelled FActScore-style, and the
response reward 2 x (facts judged true) - 3 x (facts judged false), 0 without facts, -15 for an invalid response.

The classifier is `common.reward_model` on one fact at a time:
- paper scale: the paper's prompts (bios "{fact} Is the answer to the question correct?", plots 'Is the following a
  plot point in "{title}"? {fact}') and verdicts " Yes." / " No.";
- synthetic scale: exp04's recall-then-judge form. A fact is one of the world's statements ("Corli was born in
  Nairobi."), read back as its question and candidate answer ("Q: Where was Corli born?\\nA: Nairobi\\n"); the
  target recalls the knowledge base's answer, then judges ("Nairobi? True"). A fact the world's statements cannot
  read is judged false.

What makes a reward model conservative is its training data, not its code: facts from the policy's own SFT samples
(unfamiliar entities then carry false facts, so low predictions), or from a writer whose errors do not depend on the
entity (the standard reward model; `World.noisy_profile` at synthetic scale).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from common import factscore, reward_model, tasks

TRUE_REWARD, FALSE_REWARD, INVALID_REWARD = 2.0, -3.0, -15.0  # SPEC.md 6.3 (-15 = 5 x -3, the authors' code)
PAPER_VERDICTS = {1: "Yes.", 0: "No."}  # the paper's classifier targets (" Yes." once tokenized after the prompt)


def response_reward(n_true: int, n_false: int, valid: bool = True) -> float:
    """2 x true - 3 x false; an invalid response -15 (zero facts give 0 on their own)."""
    return TRUE_REWARD * n_true + FALSE_REWARD * n_false if valid else INVALID_REWARD


@dataclass(frozen=True)
class FactExample:
    topic: str
    fact: str
    supported: bool


def fact_examples(checker: factscore.FactChecker, topics: Sequence[str], texts: Sequence[str | None]
                  ) -> list[FactExample]:
    """Every labelled fact of the valid responses (None texts are invalid responses, they contribute none)."""
    labels = factscore.label_all(checker, topics, texts)
    return [FactExample(t, f.text, f.supported) for t, facts in zip(topics, labels) for f in facts or []]


class WorldStatements:
    """Reads a synthetic fact back into (question, candidate answer, the knowledge base's answer)."""

    def __init__(self, entities):
        from common import world

        self.entities = {e.name: e for e in entities}
        self.readers = [(a, re.compile(re.escape(a.statements[0]).replace(r"\{e\}", r"(?P<e>\S+)")
                                       .replace(r"\{v\}", r"(?P<v>\S+)") + "$"))
                        for a in world.ATTRIBUTES.values()]

    def read(self, fact: str) -> tuple[str, str, str] | None:
        for attribute, pattern in self.readers:
            match = pattern.match(fact.strip())
            entity = self.entities.get(match["e"]) if match else None
            if entity is not None and attribute.name in entity.facts:
                return attribute.question.format(e=entity.name), match["v"], entity.facts[attribute.name]
        return None


class FactClassifier:
    """Prompts, targets and judgements of the per-fact classifier at one scale (module docstring)."""

    def __init__(self, task: str, statements: WorldStatements | None = None):
        self.task, self.statements = task, statements

    @property
    def reward_format(self) -> str:
        return "direct" if self.statements is None else "recall"

    @property
    def verdicts(self) -> dict[int, str]:
        return PAPER_VERDICTS if self.statements is None else tasks.REWARD_WORDS

    def prompt(self, topic: str, fact: str) -> str | None:
        """The classifier's prompt for one fact, or None where the synthetic world cannot read it."""
        if self.statements is None:
            return tasks.fact_classifier_prompt(self.task, topic, fact)
        read = self.statements.read(fact)
        return None if read is None else tasks.triviaqa_rm_prompt(read[0], read[1], normalize=False)

    def training_data(self, examples: Sequence[FactExample]) -> tuple[list[str], list[int], list[str] | None]:
        """(prompts, rewards, recalled answers or None) for the facts the classifier can read."""
        prompts, rewards, recalled = [], [], []
        for ex in examples:
            prompt = self.prompt(ex.topic, ex.fact)
            if prompt is not None:
                prompts.append(prompt)
                rewards.append(int(ex.supported))
                recalled.append(self.statements.read(ex.fact)[2] if self.statements is not None else "")
        return prompts, rewards, recalled if self.statements is not None else None

    def judge(self, model, tokenizer, topics: Sequence[str], facts: Sequence[str], batch_size: int) -> np.ndarray:
        """Whether each fact is judged true: P(verdict "true") > 0.5, which is the greedy verdict between the
        two; a fact the classifier cannot read is judged false."""
        prompts = [self.prompt(t, f) for t, f in zip(topics, facts)]
        readable = [i for i, p in enumerate(prompts) if p is not None]
        judged = np.zeros(len(prompts), dtype=bool)
        if readable:
            p_true = reward_model.predict(model, tokenizer, [prompts[i] for i in readable], batch_size,
                                          self.reward_format, self.verdicts)
            judged[readable] = p_true > 0.5
        return judged


def predicted_rewards(classifier: FactClassifier, model, tokenizer, topics: Sequence[str],
                      facts_per_response: Sequence[Sequence[str] | None], batch_size: int) -> np.ndarray:
    """Each response's reward from the classifier's judgements of its facts (None: an invalid response)."""
    flat = [(i, f) for i, facts in enumerate(facts_per_response) for f in facts or []]
    judged = classifier.judge(model, tokenizer, [topics[i] for i, _ in flat], [f for _, f in flat], batch_size)
    n_true, n_false = np.zeros(len(topics), dtype=int), np.zeros(len(topics), dtype=int)
    for (i, _), ok in zip(flat, judged):
        (n_true if ok else n_false)[i] += 1
    return np.array([response_reward(t, f, facts is not None)
                     for t, f, facts in zip(n_true, n_false, facts_per_response)])
