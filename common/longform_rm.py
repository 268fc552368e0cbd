"""Exp.5's two-stage reward models (SPEC.md 6.3): a decomposer that splits a response into atomic facts, a per-fact
classifier trained on facts labelled FActScore-style, and the response reward 2 x (facts judged true) - 3 x (facts
judged false), 0 without facts, -15 for an invalid response.

The decomposer is the base model plus a LoRA adapter, SFT'd from the bare response to " Fact 1: {atom}\nFact 2:
{atom}..." (the labeller's atoms) and read greedily (`parse_decomposition`); both reward models share it. At
synthetic scale the labeller's own atoms stand in for it (`labeller_decomposer`; exp05 README says why).

The classifier is `common.reward_model` on one fact at a time:
- paper scale: the paper's prompts (bios "{fact} Is the answer to the question correct?", plots 'Is the following a
  plot point in "{title}"? {fact}') and verdicts " Yes." / " No.";
- synthetic scale: exp04's recall-then-judge form. A fact is one of the world's statements ("Corli was born in
  Nairobi."), read back as its question and candidate answer ("Q: Where was Corli born?\\nA: Nairobi\\n"); the
  target recalls the knowledge base's answer, then judges ("Nairobi? True"). A fact the world's statements cannot
  read is judged false.
  A fact is judged true when the classifier's probability of recalling the candidate and approving it exceeds 0.5
  (`reward_model`'s `recall_candidate`), not by the verdict after its greedy recall (exp04's reading), which
  approves an unfamiliar entity's fact whenever the recall copies the candidate. Measured on seeds 0-1 (the SFT
  model's evaluation responses, the conservative RM's mean prediction minus the truth in the most unfamiliar bin,
  bio / plot): greedy recall +3.8 / +1.4 (seed 0), +0.9 / +1.9 (seed 1); this reading +1.5 / +0.7, -0.6 / +1.5.

What makes a reward model conservative is its training data, not its code: facts from the policy's own SFT samples
(unfamiliar entities then carry false facts, so low predictions), or from a writer whose errors do not depend on the
entity (the standard reward model; `World.noisy_profile` at synthetic scale).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from common import factscore, reward_model, sampling, tasks

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


def fact_examples(topics: Sequence[str], labels: Sequence[list[factscore.Fact] | None]) -> list[FactExample]:
    """Every labelled fact of the valid responses (`factscore.label_all`'s None, an invalid response, gives none)."""
    return [FactExample(t, f.text, f.supported) for t, facts in zip(topics, labels) for f in facts or []]


def decomposition_target(facts: Sequence[str]) -> str:
    """The decomposer's SFT target: " Fact 1: {atom}\nFact 2: {atom}..." (nothing for a response without facts)."""
    return "\n".join(f"{' ' if k == 0 else ''}Fact {k + 1}: {fact}" for k, fact in enumerate(facts))


def parse_decomposition(text: str) -> list[str]:
    """The authors' reading of a decomposition: split on newlines, keep the lines ending in ".", drop each
    line's text up to its first ": " (the "Fact k" label)."""
    lines = [line.strip() for line in tasks.strip_eos(text).split("\n")]
    return [line.split(": ", 1)[-1] for line in lines if line.endswith(".")]


def decomposition_pairs(texts: Sequence[str | None], labels: Sequence[list[factscore.Fact] | None]
                        ) -> tuple[list[str], list[str]]:
    """The decomposer's (response, target) SFT pairs from labelled responses; invalid ones are left out."""
    pairs = [(text, decomposition_target([f.text for f in facts or []]))
             for text, facts in zip(texts, labels) if text is not None]
    return [p for p, _ in pairs], [t for _, t in pairs]


class FactClassifier:
    """Prompts, targets and judgements of the per-fact classifier at one scale (module docstring): the paper's
    without a `world` checker, recall-then-judge on the statements a `factscore.WorldFactChecker` writes with one."""

    def __init__(self, task: str, world: factscore.WorldFactChecker | None = None):
        self.task, self.world = task, world

    @property
    def reward_format(self) -> str:
        return "direct" if self.world is None else "recall_candidate"

    @property
    def verdicts(self) -> dict[int, str]:
        return PAPER_VERDICTS if self.world is None else tasks.REWARD_WORDS

    def query(self, topic: str, fact: str) -> tuple[str, str | None, str | None] | None:
        """(the classifier's prompt for one fact, the candidate answer it states and the answer a recall-then-judge
        target recalls, both None at paper scale), or None where the synthetic world cannot read the fact."""
        if self.world is None:
            return tasks.fact_classifier_prompt(self.task, topic, fact), None, None
        read = self.world.read_statement(fact, topic)
        return None if read is None else (tasks.triviaqa_rm_prompt(read[0], read[1], normalize=False), read[1],
                                          read[2])

    def training_data(self, examples: Sequence[FactExample]) -> tuple[list[str], list[int], list[str] | None]:
        """(prompts, rewards, recalled answers or None) for the facts the classifier can read."""
        readable = [(q, int(ex.supported)) for ex in examples if (q := self.query(ex.topic, ex.fact)) is not None]
        prompts = [prompt for (prompt, _, _), _ in readable]
        recalled = [truth for (_, _, truth), _ in readable] if self.world is not None else None
        return prompts, [reward for _, reward in readable], recalled

    def judge(self, model, tokenizer, topics: Sequence[str], facts: Sequence[str], batch_size: int) -> np.ndarray:
        """Whether each fact is judged true: P(verdict "true") > 0.5 (at paper scale the greedy verdict between the
        two); a fact the classifier cannot read is judged false."""
        queries = [self.query(t, f) for t, f in zip(topics, facts)]
        readable = [i for i, q in enumerate(queries) if q is not None]
        judged = np.zeros(len(queries), dtype=bool)
        if readable:
            candidates = [queries[i][1] for i in readable] if self.world is not None else None
            p_true = reward_model.predict(model, tokenizer, [queries[i][0] for i in readable], batch_size,
                                          self.reward_format, self.verdicts, candidates)
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


Decomposer = Callable[[Sequence[str], Sequence[str | None]], list[list[str] | None]]  # (topics, texts) -> atoms


def decompose(decomposer, tokenizer, texts: Sequence[str | None], cfg: sampling.SamplingConfig
              ) -> list[list[str] | None]:
    """Each valid response's atoms from the learned decomposer's greedy output (None for an invalid response)."""
    valid = [i for i, t in enumerate(texts) if t is not None]
    out: list[list[str] | None] = [None] * len(texts)
    if valid:
        generations = sampling.generate(decomposer, tokenizer, [texts[i] for i in valid], cfg, desc="decomposer")
        for i, (g,) in zip(valid, generations):
            out[i] = parse_decomposition(g)
    return out


def learned_decomposer(model, tokenizer, cfg: sampling.SamplingConfig) -> Decomposer:
    return lambda topics, texts: decompose(model, tokenizer, texts, cfg)


def labeller_decomposer(checker: factscore.FactChecker) -> Decomposer:
    """The labeller's own atoms in place of a learned decomposer (the synthetic scale: the world's grammar)."""
    return lambda topics, texts: [None if facts is None else [f.text for f in facts]
                                  for facts in factscore.label_all(checker, topics, texts)]


@dataclass
class TwoStageRewardModel:
    """Response -> reward: the decomposer's atoms, each judged by the classifier."""

    decomposer: Decomposer
    classifier_model: object
    classifier: FactClassifier
    tokenizer: object
    batch_size: int

    def rewards(self, topics: Sequence[str], texts: Sequence[str | None]) -> np.ndarray:
        """Each response's predicted reward (None texts: invalid responses, -15)."""
        return predicted_rewards(self.classifier, self.classifier_model, self.tokenizer, topics,
                                 self.decomposer(topics, texts), self.batch_size)
