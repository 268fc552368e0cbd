"""Unfamiliarity scores, computed once with the *pretrained* base model (SPEC.md section 1) and cached on disk.

- MMLU-style: the negative log-likelihood of the correct answer under the base model's predicted distribution
  over the four options. `scoring="letter"` reads the four letter tokens after the 5-shot prompt (the paper);
  `scoring="cloze"` normalises the likelihoods of the option texts (the synthetic world's choice, see README).
- TriviaQA-style: how many of 12 few-shot samples are incorrect. The same few-shot sampler supplies the
  reward models' incorrect answers.
- Long-form: the mean number of false facts in 2 few-shot samples, labelled by a `common.factscore` checker.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from common import cache, results, sampling, tasks

log = logging.getLogger(__name__)

MMLU_FAMILIAR_PROB = 0.7  # familiar iff p(correct) > 0.7, i.e. NLL < -ln 0.7 (SPEC.md 1.1, code's rule)


@dataclass(frozen=True)
class QAScoringSettings:
    """SPEC.md 1.2 [PROPOSED]: 5 shots, 12 samples at T=1, <= 32 new tokens, cut at the first newline."""

    n_shots: int = 5
    n_samples: int = 12
    temperature: float = 1.0
    max_new_tokens: int = 32
    batch_size: int = 16


@dataclass(frozen=True)
class LongformScoringSettings:
    """SPEC.md 1.3 [PROPOSED]: 4 shots in the SFT format, 2 samples at T=1, <= 200 new tokens, cut at the first
    newline. A `stem` ("{topic} is a") replaces the few-shot prompt: the base model continues the stem and the
    stem plus its continuation is labelled."""

    n_shots: int = 4
    n_samples: int = 2
    temperature: float = 1.0
    max_new_tokens: int = 200
    batch_size: int = 16
    stem: str = ""


def mmlu_is_familiar(nll: np.ndarray) -> np.ndarray:
    return np.exp(-np.asarray(nll)) > MMLU_FAMILIAR_PROB


def triviaqa_is_unfamiliar(n_incorrect: np.ndarray, n_samples: int = 12) -> np.ndarray:
    """Unfamiliar iff more than half the samples are incorrect: more than 6 of 12 (SPEC.md 1.2)."""
    return np.asarray(n_incorrect) > n_samples // 2


def nll_of_correct(probs: torch.Tensor, answers: Sequence[int]) -> np.ndarray:
    """-ln p(correct) from a [n, 4] probability matrix."""
    p = probs[torch.arange(len(answers)), torch.as_tensor(list(answers))]
    return (-torch.log(p.clamp_min(1e-12))).numpy()


def mmlu_choice_probs(model, tokenizer, questions: Sequence[tasks.MCQuestion],
                      exemplars: dict[str, Sequence[tasks.MCQuestion]], scoring: str = "letter",
                      batch_size: int = 16) -> torch.Tensor:
    """The base model's distribution over the four options of each question."""
    if scoring == "letter":
        prompts = [tasks.mmlu_fewshot_prompt(q, exemplars[q.subject]) for q in questions]
        letter_ids = sampling.next_token_ids(tokenizer, prompts[0], [" " + L for L in tasks.LETTERS])
        return sampling.choice_probs(model, tokenizer, prompts, letter_ids, batch_size=batch_size,
                                     desc="unfamiliarity: letters")
    if scoring in ("cloze", "item"):
        # Continuations are tokenized on their own: Llama's and the synthetic tokenizer's dummy prefix gives
        # each option its leading space. "item" asks after the whole item, its options in between (the world's
        # measure of recall across options; not an unfamiliarity score).
        prompts = [f"Q: {q.question}\nA:" if scoring == "cloze" else tasks.mc_block(q) for q in questions]
        logp, n_tokens = sampling.continuation_logprobs(model, tokenizer, prompts, [q.choices for q in questions],
                                                        batch_size=batch_size, desc=f"unfamiliarity: {scoring}")
        return torch.softmax(logp / n_tokens, dim=-1)
    raise ValueError(f"unknown MMLU scoring {scoring!r}; use 'letter', 'cloze' or 'item'")


def fewshot_samples(model, tokenizer, questions: Sequence[tasks.QAQuestion],
                    exemplar_pool: Sequence[tasks.QAQuestion], settings: QAScoringSettings,
                    seed: int) -> list[list[str]]:
    """`n_samples` few-shot base-model samples per question (SPEC.md 1.2), exemplars drawn from the pool."""
    rng = np.random.default_rng([seed, 11])
    prompts = []
    for q in questions:
        candidates = rng.choice(len(exemplar_pool), size=settings.n_shots + 1, replace=False)
        shots = [exemplar_pool[i] for i in candidates if exemplar_pool[i].question_id != q.question_id]
        prompts.append(tasks.qa_fewshot_prompt(q, shots[: settings.n_shots]))
    cfg = sampling.SamplingConfig(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                  num_samples=settings.n_samples, stop=("\n",), batch_size=settings.batch_size)
    return sampling.generate(model, tokenizer, prompts, cfg, desc="few-shot samples", generator_seed=seed)


def count_incorrect_samples(model, tokenizer, questions: Sequence[tasks.QAQuestion],
                            exemplar_pool: Sequence[tasks.QAQuestion], settings: QAScoringSettings,
                            seed: int) -> np.ndarray:
    """For each question, how many of `n_samples` few-shot samples are incorrect."""
    samples = fewshot_samples(model, tokenizer, questions, exemplar_pool, settings, seed)
    return np.array([sum(not tasks.grade_fewshot_sample(s, q) for s in group) for group, q in zip(samples, questions)])


def mean_false_facts(samples: Sequence[Sequence[str]], items: Sequence[tasks.LongformItem], checker) -> np.ndarray:
    """For each item, the mean over its samples of the false facts the checker finds; the task's prefix is stripped
    first, and a sample without a decision counts 0 false facts (SPEC.md 1.3)."""
    from common import factscore

    def false_facts(sample: str, item: tasks.LongformItem) -> int:
        text = tasks.strip_eos(sample.split("\n", 1)[0]).strip()
        prefix = tasks.LONGFORM_PREFIXES[item.task].strip()
        text = text[len(prefix):].lstrip() if text.startswith(prefix) else text
        return factscore.fact_counts(checker.label(item.topic, text))[1]

    return np.array([np.mean([false_facts(s, item) for s in group]) for group, item in zip(samples, items)])


def count_false_facts(model, tokenizer, items: Sequence[tasks.LongformItem], exemplar_pool: Sequence[tasks.LongformItem],
                      checker, settings: LongformScoringSettings, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 12])

    def prompt(item):
        if settings.stem:
            return settings.stem.format(topic=item.topic)
        candidates = rng.choice(len(exemplar_pool), size=settings.n_shots + 1, replace=False)
        shots = [exemplar_pool[i] for i in candidates if exemplar_pool[i].topic != item.topic]
        return tasks.longform_fewshot_prompt(item, shots[: settings.n_shots])

    prompts = [prompt(item) for item in items]
    cfg = sampling.SamplingConfig(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                  num_samples=settings.n_samples, stop=("\n",), batch_size=settings.batch_size)
    samples = sampling.generate(model, tokenizer, prompts, cfg, desc="long-form base samples", generator_seed=seed)
    if settings.stem:
        samples = [[tasks.with_lead(stem, s) for s in group] for stem, group in zip(prompts, samples)]
    return mean_false_facts(samples, items, checker)


def sample_incorrect_answers(model, tokenizer, questions: Sequence[tasks.QAQuestion],
                             exemplar_pool: Sequence[tasks.QAQuestion], settings: QAScoringSettings, seed: int,
                             max_rounds: int) -> list[str]:
    """One incorrect answer per question, for reward-0 examples (SPEC.md section 5 [PROPOSED]): the first few-shot
    base-model sample whose normalised form is non-empty and matches no alias. Questions still without one draw
    another round of `n_samples`, up to `max_rounds`; "" marks a question the model never got wrong."""
    answers = [""] * len(questions)
    todo = list(range(len(questions)))
    for r in range(max_rounds):
        round_seed = int(np.random.default_rng([seed, 13, r]).integers(2**31))
        samples = fewshot_samples(model, tokenizer, [questions[i] for i in todo], exemplar_pool, settings, round_seed)
        for i, group in zip(todo, samples):
            answers[i] = next((a for a in (tasks.strip_eos(s.split("\n", 1)[0]).strip() for s in group)
                               if tasks.normalize_answer(a) and not tasks.grade_fewshot_sample(a, questions[i])), "")
        todo = [i for i in todo if not answers[i]]
        if not todo:
            break
    return answers


def cached_scores(kind: str, model_key: str, ids: Sequence[str], settings: object, compute,
                  cache_hits: dict | None = None, dtype: type = float) -> np.ndarray:
    """Scores for `ids` from `<cache>/unfamiliarity/<hash>.csv`, computed with `compute()` on a miss.

    The key covers the model, the task, every question id and the settings, so any change recomputes.
    `dtype=str` stores text (an empty string stays empty, not NaN).
    """
    path = cache.cache_root() / "unfamiliarity" / f"{kind}-{cache.config_hash(model_key, kind, list(ids), settings)}.csv"
    hit = path.exists()
    if cache_hits is not None:
        cache_hits[f"unfamiliarity_{kind}"] = hit
    if hit:
        frame = pd.read_csv(path, dtype={"id": str, "score": dtype}, na_filter=dtype is not str)
        if list(frame["id"]) == list(ids):
            return frame["score"].to_numpy()
        log.warning("cached scores at %s do not match the questions; recomputing", path)
    scores = np.asarray(compute(), dtype=dtype)
    results.write_csv(Path(path), pd.DataFrame({"id": list(ids), "score": scores}), float_format=None)
    return scores


def mmlu_unfamiliarity(model, tokenizer, model_key: str, questions: Sequence[tasks.MCQuestion],
                       exemplars: dict[str, Sequence[tasks.MCQuestion]], scoring: str = "letter",
                       cache_hits: dict | None = None, batch_size: int = 16) -> np.ndarray:
    ids = [f"{q.subject}|{q.question}|{'|'.join(q.choices)}|{q.answer}" for q in questions]
    shots = {s: [f"{q.question}|{q.answer}" for q in qs] for s, qs in exemplars.items()}
    return cached_scores(
        f"mmlu-{scoring}", model_key, ids, {"scoring": scoring, "exemplars": shots},
        lambda: nll_of_correct(mmlu_choice_probs(model, tokenizer, questions, exemplars, scoring, batch_size),
                               [q.answer for q in questions]),
        cache_hits)


def triviaqa_unfamiliarity(model, tokenizer, model_key: str, questions: Sequence[tasks.QAQuestion],
                           exemplar_pool: Sequence[tasks.QAQuestion], settings: QAScoringSettings = QAScoringSettings(),
                           seed: int = 0, cache_hits: dict | None = None) -> np.ndarray:
    ids = [q.question_id for q in questions]
    return cached_scores(
        "triviaqa", model_key, ids, {"settings": settings, "seed": seed,
                                     "pool": [q.question_id for q in exemplar_pool]},
        lambda: count_incorrect_samples(model, tokenizer, questions, exemplar_pool, settings, seed),
        cache_hits)


def triviaqa_incorrect_answers(model, tokenizer, model_key: str, questions: Sequence[tasks.QAQuestion],
                               exemplar_pool: Sequence[tasks.QAQuestion],
                               settings: QAScoringSettings = QAScoringSettings(), seed: int = 0, max_rounds: int = 4,
                               cache_hits: dict | None = None) -> np.ndarray:
    ids = [q.question_id for q in questions]
    return cached_scores(
        "triviaqa-incorrect-answers", model_key, ids,
        {"settings": settings, "seed": seed, "max_rounds": max_rounds, "pool": [q.question_id for q in exemplar_pool]},
        lambda: sample_incorrect_answers(model, tokenizer, questions, exemplar_pool, settings, seed, max_rounds),
        cache_hits, dtype=str)


def longform_unfamiliarity(model, tokenizer, model_key: str, items: Sequence[tasks.LongformItem],
                           exemplar_pool: Sequence[tasks.LongformItem], checker,
                           settings: LongformScoringSettings = LongformScoringSettings(), seed: int = 0,
                           cache_hits: dict | None = None) -> np.ndarray:
    """Mean false facts over few-shot base-model samples; the key names the checker (`checker.key`) too."""
    task = items[0].task if items else "none"
    return cached_scores(
        f"longform-{task}", model_key, [it.topic for it in items],
        {"settings": settings, "seed": seed, "checker": checker.key, "pool": [it.topic for it in exemplar_pool]},
        lambda: count_false_facts(model, tokenizer, items, exemplar_pool, checker, settings, seed), cache_hits)
