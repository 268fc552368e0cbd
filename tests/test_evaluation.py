import math

import numpy as np
import pytest

from common import evaluation, tasks
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
