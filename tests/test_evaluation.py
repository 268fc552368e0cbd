import math

import numpy as np
import pandas as pd
import pytest

from common import evaluation, tasks
from common.buckets import Bins
from conftest import last_token_model

Q = tasks.MCQuestion("Where was Velorin born?", "x", ("Rome", "Paris", "Velorin", "Tovtan"), answer=1)


def answer_model(tokenizer, probs: dict[str, float]):
    """After the prompt's final space, the next token is drawn from `probs` (hand-set logits ln p)."""
    return last_token_model(tokenizer, {" ": 0}, {(0, piece): math.log(p) for piece, p in probs.items()})


def test_letter_answers_are_read_at_the_answer_position(tiny_tokenizer):
    model = answer_model(tiny_tokenizer, {" A": 0.7, " B": 0.1, " C": 0.15, " D": 0.05})
    frame = evaluation.mmlu_answer_distribution(model, tiny_tokenizer, [Q], np.array([0.3]), "letter", 4,
                                                np.random.default_rng(0))
    assert frame["gt"].tolist() == ["A", "B", "C", "D"] and frame.nll.tolist() == [0.3] * 4
    for letter, p in zip("ABCD", (0.7, 0.1, 0.15, 0.05)):
        assert frame[f"p_{letter}"].tolist() == pytest.approx([p] * 4, abs=1e-5)


def test_text_answers_follow_the_correct_option_to_every_letter(tiny_tokenizer):
    # the model says "Paris" (the right answer) with 0.5 wherever it is placed; E is the fifth answer
    model = answer_model(tiny_tokenizer, {" Paris": 0.5, " Rome": 0.2, " Velorin": 0.1, " Tovtan": 0.1, " E": 0.1})
    frame = evaluation.mmlu_answer_distribution(model, tiny_tokenizer, [Q], np.array([0.3]), "text", 4,
                                                np.random.default_rng(0), abstain=True, gt_letters=("A", "C"))
    assert frame["gt"].tolist() == ["A", "C"]
    assert frame.p_A.iloc[0] == pytest.approx(0.5, abs=1e-5) and frame.p_C.iloc[1] == pytest.approx(0.5, abs=1e-5)
    assert frame.p_E.tolist() == pytest.approx([0.1, 0.1], abs=1e-5)
    probs = frame[[f"p_{L}" for L in "ABCDE"]].to_numpy()
    assert probs.sum(1) == pytest.approx([1.0, 1.0]) and sorted(probs[0].round(4)) == [0.1, 0.1, 0.1, 0.2, 0.5]


def test_triviaqa_table_averages_each_questions_samples_first():
    # q1 (2 incorrect of 12): 3 samples, IDK twice; q2 (3 incorrect): 1 sample, correct; q3 (9): 2 samples, wrong
    frame = pd.DataFrame({"question_id": ["q1", "q1", "q1", "q2", "q3", "q3"], "n_incorrect": [2, 2, 2, 3, 9, 9],
                          "category": [tasks.IDK_CATEGORY, tasks.IDK_CATEGORY, tasks.CORRECT, tasks.CORRECT,
                                       tasks.INCORRECT, tasks.MALFORMED]})
    frame["correct"] = frame.category == tasks.CORRECT
    frame["idk"] = frame.category == tasks.IDK_CATEGORY
    frame["incorrect"] = frame.category.isin([tasks.INCORRECT, tasks.MALFORMED])
    frame["malformed"] = frame.category == tasks.MALFORMED
    table = evaluation.triviaqa_table(frame, Bins((0, 4, 13), closed="left"))
    assert table["count"].tolist() == [2, 1]  # questions, not samples
    # bin [0, 4): q1 IDK 2/3 and q2 IDK 0 weigh the same -> 1/3 (pooling the samples would give 2/4)
    assert table.idk_mean.tolist()[0] == pytest.approx(1 / 3)
    assert table.correct_mean.tolist()[0] == pytest.approx((1 / 3 + 1) / 2)
    assert table.incorrect_mean.tolist() == pytest.approx([0.0, 1.0]) and table.malformed_mean[1] == 0.5
