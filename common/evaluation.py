"""How finetuned models are evaluated by unfamiliarity bin (SPEC.md sections 2-4): the MMLU answer distribution
with the correct option placed at each letter in turn, and one graded TriviaQA sample per question."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from common import sampling, tasks
from common.buckets import Bins, summarize_by_bin

TRIVIAQA_OUTCOMES = ("correct", "idk", "incorrect")  # malformed outputs are plotted as incorrect (SPEC.md 3)


def mmlu_answer_distribution(model, tokenizer, questions: Sequence[tasks.MCQuestion], nll: np.ndarray,
                             answer: str, batch_size: int, rng: np.random.Generator,
                             abstain: bool = False, gt_letters: Sequence[str] = tasks.LETTERS) -> pd.DataFrame:
    """For every question and every ground-truth letter L in `gt_letters`: the correct option placed at L, the
    finetuned model's distribution over its answers (A-D, and E when it can abstain), read as a softmax over the
    answer tokens at the answer position (one forward pass per batch) or, for the formats with the option's text
    (`tasks.MC_ANSWER_FORMATS`), over the answers' sequence log-likelihoods. Columns p_A .. p_D (p_E)."""
    letters = tasks.LETTERS + ((tasks.ABSTAIN_LETTER,) if abstain else ())
    prompts, options, rows = [], [], []
    for i, q in enumerate(questions):
        for letter in gt_letters:
            choices = tasks.place_correct(q, tasks.LETTERS.index(letter), rng)
            prompts.append(tasks.mmlu_sft_prompt(q.question, choices))
            options.append(choices)
            rows.append({"question": i, "gt": letter, "nll": nll[i]})
    if answer != "letter":
        answers = [[tasks.mmlu_sft_answer(c, j, answer) for j in range(4)] for c in options]
        answers = [a + [tasks.ABSTAIN_LETTER] if abstain else a for a in answers]
        logp, _ = sampling.continuation_logprobs(model, tokenizer, prompts, answers, batch_size=batch_size,
                                                 desc="evaluate answers")
        probs = torch.softmax(logp, dim=-1).numpy()
    else:
        probs = sampling.choice_probs(model, tokenizer, prompts, sampling.first_token_ids(tokenizer, letters),
                                      batch_size=batch_size, desc="evaluate letters").numpy()
    frame = pd.DataFrame(rows)
    for j, letter in enumerate(letters):
        frame[f"p_{letter}"] = probs[:, j]
    return frame


def mmlu_panel_tables(frame: pd.DataFrame, bins: Bins) -> dict[str, pd.DataFrame]:
    """One table per ground-truth letter: per bin, the count, the mean NLL and mean/std of each answer's prob."""
    columns = [c for c in frame.columns if c.startswith("p_")]
    return {gt: summarize_by_bin(frame[frame["gt"] == gt], "nll", bins, columns) for gt in frame["gt"].unique()}


def triviaqa_outcomes(model, tokenizer, questions: Sequence[tasks.QAQuestion], n_incorrect: np.ndarray,
                      cfg: sampling.SamplingConfig, seed: int) -> pd.DataFrame:
    """`cfg.num_samples` samples per question (T=1), one row each, graded correct / idk / incorrect / malformed."""
    prompts = [tasks.triviaqa_sft_prompt(q.question) for q in questions]
    generations = sampling.generate(model, tokenizer, prompts, cfg, desc="evaluate", generator_seed=seed)
    rows = [(q.question_id, n, k, g, tasks.grade_short_answer(g, q))
            for q, n, samples in zip(questions, n_incorrect, generations) for k, g in enumerate(samples)]
    frame = pd.DataFrame(rows, columns=["question_id", "n_incorrect", "sample", "generation", "category"])
    frame["correct"] = frame.category == tasks.CORRECT
    frame["idk"] = frame.category == tasks.IDK_CATEGORY
    frame["incorrect"] = frame.category.isin([tasks.INCORRECT, tasks.MALFORMED])
    frame["malformed"] = frame.category == tasks.MALFORMED
    return frame


def triviaqa_table(frame: pd.DataFrame, bins: Bins) -> pd.DataFrame:
    """Per bin, the outcome rates over its questions, each question's samples averaged first (so `count` counts
    questions and each weighs the same)."""
    outcomes = [*TRIVIAQA_OUTCOMES, "malformed"]
    per_question = frame.groupby(["question_id", "n_incorrect"], as_index=False, sort=False)[outcomes].mean()
    return summarize_by_bin(per_question, "n_incorrect", bins, outcomes)
