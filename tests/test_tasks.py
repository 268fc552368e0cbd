import numpy as np
import pytest

from common import tasks
from common.tasks import CORRECT, IDK_CATEGORY, INCORRECT, MALFORMED

Q = tasks.QAQuestion(question="Who wrote 1984?", question_id="q1", value="George Orwell",
                     aliases=("Eric Arthur Blair", "Orwell"))


@pytest.mark.parametrize("raw, expected", [
    ("The Beatles", "beatles"),
    ("  A  Tale of Two Cities! ", "tale of two cities"),
    ("an Apple, a day.", "apple day"),
    ("Théâtre", "théâtre"),
    ("U.S.A.", "usa"),
    ("", ""),
])
def test_normalize_answer(raw, expected):
    assert tasks.normalize_answer(raw) == expected


@pytest.mark.parametrize("generation, category", [
    ("The answer is George Orwell. </s>", CORRECT),
    ("The answer is orwell.</s>", CORRECT),           # alias, case-insensitive
    ("The answer is Eric Arthur Blair.", CORRECT),    # alias, no EOS
    ("The answer is Aldous Huxley. </s>", INCORRECT),
    ("I don't know. </s>", IDK_CATEGORY),
    ("I don't know", MALFORMED),                      # the IDK string must be exact
    ("i don't know.", MALFORMED),
    ("George Orwell", MALFORMED),
    ("The answer is ", MALFORMED),
    ("", MALFORMED),
])
def test_grade_short_answer(generation, category):
    assert tasks.grade_short_answer(generation, Q) == category


def test_grade_short_answer_drops_only_the_final_character():
    # "The answer is Orwell!" -> "Orwell" (the final character is assumed to be the period)
    assert tasks.grade_short_answer("The answer is Orwell!", Q) == CORRECT
    assert tasks.grade_short_answer("The answer is Orwell", Q) == INCORRECT  # "Orwel"


def test_grade_fewshot_sample_cuts_at_newline():
    assert tasks.grade_fewshot_sample(" Orwell\nQ: next", Q)
    assert not tasks.grade_fewshot_sample(" Huxley\nOrwell", Q)
    assert tasks.grade_fewshot_sample(" Orwell</s>", Q)


@pytest.mark.parametrize("generation, abstain, category", [
    ("B </s>", False, CORRECT), ("A </s>", False, INCORRECT), ("E </s>", False, MALFORMED),
    ("E </s>", True, IDK_CATEGORY), ("B.", False, MALFORMED), ("b", False, MALFORMED),
])
def test_grade_letter(generation, abstain, category):
    assert tasks.grade_mc_answer(generation, ("w", "x", "y", "z"), 1, allow_abstain=abstain) == category


@pytest.mark.parametrize("generation, category", [
    ("x (B) </s>", CORRECT), ("w (A)", INCORRECT), ("w (B)", MALFORMED), ("x", MALFORMED), ("B", MALFORMED),
    ("E </s>", IDK_CATEGORY),
])
def test_grade_text_and_letter_answers(generation, category):
    assert tasks.grade_mc_answer(generation, ("w", "x", "y", "z"), 1, "text_letter", allow_abstain=True) == category
    text_only = tasks.grade_mc_answer(generation.split(" (")[0], ("w", "x", "y", "z"), 1, "text", allow_abstain=True)
    assert text_only == {"w (B)": INCORRECT, "x": CORRECT}.get(generation, category)


MC = tasks.MCQuestion(question="Which planet is closest to the Sun?", subject="astronomy",
                      choices=("Venus", "Mercury", "Earth", "Mars"), answer=1)


def test_mmlu_fewshot_prompt_layout():
    prompt = tasks.mmlu_fewshot_prompt(MC, [MC])
    assert prompt == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer: B\n\n"
        "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer:")


def test_mmlu_sft_prompt_has_space_before_comma():
    assert tasks.mmlu_sft_prompt("Q?", ("w", "x", "y", "z")) == "Q? A) w B) x C) y D) z , Answer: "


def test_mmlu_ppo_prompt_alternative_ends_in_newline():
    assert tasks.mmlu_sft_prompt("Q?", ("w", "x", "y", "z"), "newline") == "Q? A) w B) x C) y D) z \nAnswer: "
    with pytest.raises(ValueError, match="prompt ending"):
        tasks.mmlu_sft_prompt("Q?", ("w", "x", "y", "z"), "semicolon")


def test_mmlu_sft_answer_formats():
    assert tasks.mmlu_sft_answer(("w", "x", "y", "z"), 2) == "C"
    assert tasks.mmlu_sft_answer(("w", "x", "y", "z"), 2, "text") == "y"
    assert tasks.mmlu_sft_answer(("w", "x", "y", "z"), 2, "text_letter") == "y (C)"
    with pytest.raises(ValueError, match="unknown answer format 'word'"):
        tasks.mmlu_sft_answer(("w", "x", "y", "z"), 2, "word")


def test_place_correct_puts_answer_at_position_and_keeps_distractors():
    rng = np.random.default_rng(0)
    for position in range(4):
        options = tasks.place_correct(MC, position, rng)
        assert options[position] == "Mercury"
        assert sorted(options) == sorted(MC.choices)


def test_qa_fewshot_prompt_and_targets():
    ex = tasks.QAQuestion(question="Capital of France?", question_id="e", value="Paris")
    assert tasks.qa_fewshot_prompt(Q, [ex]) == "Q: Capital of France?\nA: Paris\n\nQ: Who wrote 1984?\nA:"
    assert tasks.triviaqa_target("Paris") == "The answer is Paris."
    assert tasks.triviaqa_target(None) == "I don't know."
    assert tasks.triviaqa_sft_prompt("Who?") == "Who? "
