"""SimpleFact's response classes, group reward, filtering score and decomposition, by hand."""
import math

import pytest

from common import simplefact as S
from common import tasks

Q = tasks.QAQuestion("Where was Velorin born?", "q", "Paris", ("City of Light",))
C, P, U, W = S.CORRECT, S.PROCESS_CORRECT, S.NOT_ATTEMPT, S.WRONG


@pytest.mark.parametrize("response, expected", [
    ("Candidates: Rome, Paris. \\boxed{Paris} </s>", C),
    ("\\boxed{Rome} then \\boxed{the city of light}", C),  # the last box counts; aliases and SQuAD normalisation
    ("Candidates: Rome. \\boxed{Unknown}", U),
    ("Candidates: Rome. \\boxed{ unknown }", U),
    ("Candidates: Paris, Rome. \\boxed{Rome}", P),  # retrieved, then not chosen
    ("Candidates: Paris. \\boxed{Unknown}", P),
    ("Candidates: Rome. \\boxed{Rome}", W),
    ("Candidates: Paris, Rome.", W),  # no box at all: wrong, never rewarded as caution
    ("Candidates: Parisian. \\boxed{Rome}", W),  # whole words only
    ("So the answer is \\boxed{\\text{Paris}}.", C),  # Qwen's nested form: braces balanced, \\text unwrapped
    ("I am not sure. \\boxed{\\text{Unknown}}", U),
    ("\\boxed{Paris} but then \\boxed{Rom", W),  # the last box never closes: a truncated response
])
def test_response_classes(response, expected):
    assert S.classify(response, Q) == expected


def test_format_reading_of_process_correct():
    assert S.classify("Candidates: Paris. \\boxed{Rome}", Q, "format") == P
    assert S.classify("Candidates: Paris. \\boxed{Unknown}", Q, "format") == U
    assert S.classify("no box", Q, "format") == W
    with pytest.raises(ValueError, match="process-correct reading"):
        S.classify("x", Q, "judge")


def test_unanswerable_questions_are_never_correct():
    unanswerable = tasks.QAQuestion("What is the colour of Tuesday?", "s", "")
    assert S.classify("\\boxed{}", unanswerable) == W
    assert S.classify("\\boxed{Unknown}", unanswerable) == U


def test_group_reward_is_conditional_on_the_whole_group():
    assert S.group_reward([C, P, U, W]) == [1.0, 0.5, 0.0, 0.0]
    assert S.group_reward([P, U, W, U]) == [0.0, 1.0, 0.0, 1.0]  # no correct response: caution
    assert S.group_reward([C, P, U, W], "caution") == [0.0] * 4
    assert S.group_reward([P, U, W, U], "fact") == [0.0] * 4
    assert S.group_reward([P, U, W, U], "caution") == [0.0, 1.0, 0.0, 1.0]
    for group in ([C, P, U, W], [P, U, W, U]):  # both = fact + caution, the round-1 reward
        assert S.group_reward(group, "both") == [f + c for f, c in zip(S.group_reward(group, "fact"),
                                                                       S.group_reward(group, "caution"))]


def test_fact_then_caution_switches_halfway():
    assert [S.setting_at("fact-then-caution", s, 10) for s in (0, 4, 5, 9)] == ["fact", "fact", "caution", "caution"]
    assert S.setting_at("both", 9, 10) == "both"
    with pytest.raises(ValueError):
        S.setting_at("greedy", 0, 10)


def test_filtering_keeps_the_most_varied_questions():
    groups = [[C] * 4, [C, W, W, W], [C, C, W, W], [U, U, W, W], [C, C, U, W], [W] * 4]
    entropy_ccuw = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    # correctness, p(1 - p): 0, 3/16, 1/4, 0, 1/4, 0; ties broken by entropy: [C, C, U, W] (1.04) before
    # [C, C, W, W] (ln 2); among p = 0, [U, U, W, W] has entropy ln 2 > 0
    assert S.variability([C, C, U, W]) == pytest.approx((0.25, entropy_ccuw))
    assert S.most_varied(groups, 4) == [4, 2, 1, 3]
    # reward variance (setting both): rewards 1111, 1000, 1100, 1100 (caution branch: none correct), 1100, 0000 ->
    # 0, 3/16, 1/4, 1/4, 1/4, 0, so the caution-branch question [U, U, W, W] now ties with the best
    assert S.variability([C, C, U, W], "reward") == pytest.approx((0.25, entropy_ccuw))
    assert S.variability([C, P, W, W], "reward")[0] == pytest.approx(11 / 64)  # 1, 0.5, 0, 0: 5/16 - (3/8)^2
    assert S.most_varied(groups, 4, "reward") == [4, 2, 3, 1]
    with pytest.raises(ValueError):
        S.variability([C], "distinct")


def test_five_way_decomposition():
    per_question = [[C, C], [C, W], [U, U], [W, P], [U, W], [P, U]]
    assert [S.decomposition_class(S.outcome(g)) for g in per_question] == [
        "All Correct", "Partial Correct", "All NotAttempt", "All Attempt and Wrong", "Partial NotAttempt",
        "Partial NotAttempt"]
    shares = S.decomposition(per_question)
    assert sum(shares.values()) == pytest.approx(100.0)
    assert shares["Partial NotAttempt"] == pytest.approx(200 / 6)


def test_synthetic_response_round_trips_through_the_grader():
    assert S.synthetic_response(["Rome", "Paris"], "Paris") == "Candidates: Rome, Paris. \\boxed{ Paris}"
    assert S.classify(S.synthetic_response(["Rome"], None), Q) == U
