"""The data construction of each experiment, checked by hand on small inputs."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common import tasks

ROOT = Path(__file__).resolve().parent.parent


def load_run(folder: str):
    spec = importlib.util.spec_from_file_location(f"{folder}_run", ROOT / folder / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


exp01 = load_run("exp01_mmlu_sft")
exp02 = load_run("exp02_triviaqa_sft")

MC = [tasks.MCQuestion(f"q{i}?", "s", (f"right{i}", "w1", "w2", "w3"), 0) for i in range(10)]


def test_exp01_dist1_rebalances_unfamiliar_with_replacement():
    familiar = np.array([True, True, True] + [False] * 7)
    prompts, targets, built = exp01.build_distribution(MC, familiar, 1, True, "letter", np.random.default_rng(0))
    assert len(prompts) == 6 and built.familiar.sum() == 3
    for p, t in zip(prompts, targets):  # the target letter names the slot holding the right answer
        i = int(p.split("?")[0][1:])
        assert f"{t}) right{i} " in p
    _, answers, _ = exp01.build_distribution(MC, familiar, 1, True, "text_letter", np.random.default_rng(0))
    assert answers == [f"right{int(p.split('?')[0][1:])} ({t})" for p, t in zip(prompts, targets)]  # same draws
    _, targets, built = exp01.build_distribution(MC, familiar, 1, False, "letter", np.random.default_rng(0))
    assert len(targets) == 10  # the authors' un-rebalanced variant keeps the whole pool


def test_exp01_dist2_puts_unfamiliar_answers_at_b_or_c_only():
    familiar = np.array([True] * 5 + [False] * 5)
    many = MC * 40
    fam = np.tile(familiar, 40)
    prompts, answers, built = exp01.build_distribution(many, fam, 2, True, "text_letter", np.random.default_rng(1))
    unf_targets = set(built[~built.familiar].target)
    assert unf_targets == {"B", "C"}
    for p, a, letter in zip(prompts, answers, built.target):  # the answer quotes the option in the target's slot
        text = a.removesuffix(f" ({letter})")
        assert text != a and f"{letter}) {text} " in p
    assert set(built[built.familiar].target) == {"A", "B", "C", "D"}


def test_exp01_claims_from_hand_made_tables():
    def table(first, last):
        return pd.DataFrame([{"count": 5, **{f"p_{L}_mean": v for L, v in zip("ABCD", first)}},
                             {"count": 0, **{f"p_{L}_mean": np.nan for L in "ABCD"}},
                             {"count": 5, **{f"p_{L}_mean": v for L, v in zip("ABCD", last)}}])
    tables = {gt: table([0.9 if L == gt else 0.033 for L in "ABCD"], [0.2, 0.3, 0.3, 0.2]) for gt in "ABCD"}
    c = {x.id: x for x in exp01.distribution_claims(1, tables)}
    assert c["fig2.mmlu.dist1.familiar_gt"].value == pytest.approx(0.9)
    assert c["fig2.mmlu.dist1.unfamiliar_uniform"].value == pytest.approx(0.05)  # the empty bin is skipped
    c = {x.id: x for x in exp01.distribution_claims(2, tables)}
    assert c["fig2.mmlu.dist2.unfamiliar_b_c"].value == pytest.approx(0.6) and not c[
        "fig2.mmlu.dist2.unfamiliar_b_c"].passed


QA = [tasks.QAQuestion(f"q{i}?", f"id{i}", f"v{i}") for i in range(10)]


def test_exp02_distributions_relabel_the_right_examples():
    unfamiliar = np.array([False] * 6 + [True] * 4)
    _, targets, idk = exp02.build_distribution(QA, unfamiliar, 1, np.random.default_rng(0))
    assert not idk.any() and targets[0] == "The answer is v0."
    _, targets, idk = exp02.build_distribution(QA, unfamiliar, 2, np.random.default_rng(0))
    assert idk.tolist() == unfamiliar.tolist() and targets[9] == "I don't know."
    _, targets, idk = exp02.build_distribution(QA, unfamiliar, 3, np.random.default_rng(0))
    assert idk.sum() == 4 and sum(t == "I don't know." for t in targets) == 4  # matched to dist.2's ratio


def test_exp02_claims_from_a_hand_made_table():
    table = pd.DataFrame({"count": [10, 0, 10], "correct_mean": [0.8, np.nan, 0.1], "idk_mean": [0.1, np.nan, 0.6],
                          "incorrect_mean": [0.1, np.nan, 0.3]})
    c = {x.id: x for x in exp02.distribution_claims(2, table)}
    assert c["fig2.triviaqa.dist2.idk_last"].value == pytest.approx(0.6) and c["fig2.triviaqa.dist2.idk_last"].passed
    c = {x.id: x for x in exp02.distribution_claims(3, table)}
    assert c["fig2.triviaqa.dist3.idk_flat"].value == pytest.approx(0.5)
    assert c["fig2.triviaqa.dist3.incorrect_rises"].value == pytest.approx(0.2)


exp03 = load_run("exp03_rl_abstain")


def test_exp03_claims_from_hand_made_tables(tmp_path):
    def mmlu(p_gt, p_e):  # three bins, an empty middle one that claims must skip
        return pd.DataFrame({"count": [5, 0, 5], "p_A_mean": p_gt, "p_B_mean": p_gt, "p_E_mean": p_e})

    for gt in "AB":
        mmlu([0.9, np.nan, 0.3], [0.05, np.nan, 0.08]).to_csv(tmp_path / f"mmlu_rl1_gt{gt}.csv", index=False)
    mmlu([0.75, np.nan, 0.2], [0.1, np.nan, 0.6]).to_csv(tmp_path / "mmlu_rl2_gtA.csv", index=False)
    mmlu([0.8, np.nan, 0.2], [0.2, np.nan, 0.55]).to_csv(tmp_path / "mmlu_rl2_gtB.csv", index=False)
    pd.DataFrame({"count": [4, 4], "correct_mean": [0.8, 0.1], "idk_mean": [0.0, 0.12]}).to_csv(
        tmp_path / "triviaqa_rl1.csv", index=False)
    c = {x.id: x for x in exp03.compute_claims(tmp_path)}
    assert c["fig3.mmlu.first.no_abstain"].value == pytest.approx(0.08) and c["fig3.mmlu.first.no_abstain"].passed
    # panel B: last bin 0.55 - 0.5 = 0.05, rise 0.55 - 0.2 - 0.3 = 0.05; panel A: 0.1 and 0.2
    assert c["fig3.mmlu.second.abstain_last"].value == pytest.approx(0.05)
    assert c["fig3.mmlu.familiar_correct"].value == pytest.approx(0.75)  # the smallest over rewards and panels
    assert c["fig3.triviaqa.first.no_abstain"].value == pytest.approx(0.12)
    assert not c["fig3.triviaqa.first.no_abstain"].passed
    assert "fig3.triviaqa.second.abstain_last" not in c  # reward second was not run


exp05 = load_run("exp05_longform_conservative_rm")


def test_exp05_fig5_claims_read_the_most_unfamiliar_occupied_bin():
    table = pd.DataFrame({"count": [10, 5, 0], "true_reward_mean": [6.0, -4.0, np.nan],
                          "standard_reward_mean": [7.0, -1.5, np.nan], "conservative_reward_mean": [5.0, -3.5, np.nan]})
    c = {x.id: x for x in exp05.fig5_claims("bio", table)}
    overestimate = c["fig5.bio.standard_overestimates"]
    assert overestimate.value == pytest.approx(2.5) and overestimate.passed
    # conservative -3.5: standard - 2 - (-3.5) = 0 and truth + 1 - (-3.5) = 0.5: the smaller margin, 0, holds
    assert c["fig5.bio.conservative_below_standard"].value == pytest.approx(0.0)
    assert c["fig5.bio.conservative_below_standard"].passed
    table.loc[1, "conservative_reward_mean"] = -2.0  # above the standard RM's - 2.0: fails by 1.5
    assert exp05.fig5_claims("bio", table)[1].value == pytest.approx(-1.5)
    assert not exp05.fig5_claims("bio", table)[1].passed


def test_exp05_table_claim_is_the_smaller_of_its_two_margins():
    c = exp05.table_claim("bio", {"sft": 0.5, "rl_standard": 0.6, "rl_conservative": 0.7})
    assert c.id == "table.bio.order" and c.value == pytest.approx(0.05) and c.passed  # margins 0.10 and 0.05
    c = exp05.table_claim("plot", {"sft": 0.65, "rl_standard": 0.5, "rl_conservative": 0.7})
    assert c.value == pytest.approx(-0.05) and not c.passed  # 0.7 - 0.65 - 0.10


def test_exp05_fig7_claim_needs_fewer_false_facts_in_every_bin_and_most_true_facts_kept():
    def facts(rl_false, rl_true):  # bins 0-1 occupied for both methods, bin 2 empty
        return pd.DataFrame({"bin": [0, 1, 2] * 2, "count": [5, 4, 0] * 2,
                             "method": ["sft"] * 3 + ["rl_conservative"] * 3,
                             "n_false_mean": [0.5, 2.0, np.nan, *rl_false],
                             "n_true_mean": [3.0, 1.0, np.nan, *rl_true]})
    c = exp05.fig7_claim("plot", facts([0.25, 1.5, np.nan], [3.0, 0.6, np.nan]))
    # false margins 0.25 and 0.5; true facts averaged over bins 1.8 against 2.0: ratio 0.9, margin 0.1
    assert c.id == "fig7.plot.fewer_false" and c.value == pytest.approx(0.1) and c.passed
    c = exp05.fig7_claim("plot", facts([0.25, 1.5, np.nan], [2.0, 0.6, np.nan]))  # ratio 1.3 / 2.0 = 0.65
    assert c.value == pytest.approx(-0.15) and not c.passed
    assert not exp05.fig7_claim("plot", facts([0.5, 0.0, np.nan], [3.0, 1.0, np.nan])).passed  # as many false in bin 0
    assert not exp05.fig7_claim("plot", facts([0.5, 0.0, np.nan], [3.0, 1.0, np.nan]).query("method == 'sft'")).passed


def test_exp05_fig8_takes_distinct_entities_nearest_to_low_middle_and_high_unfamiliarity():
    frame = pd.DataFrame({"topic": list("abcde"), "unfamiliarity": [0.0, 0.0, 1.5, 4.0, 2.2],
                          "response": ["x."] * 5})
    result = exp05.TaskResult({"sft": frame, "rl_conservative": frame}, {"sft": [None] * 5,
                              "rl_conservative": [None] * 5}, {}, [])
    rows, cells = exp05.fig8_cells(result)
    assert rows.topic.tolist() == ["a", "a", "e", "e", "d", "d"] and len(cells) == 6


exp06 = load_run("exp06_simplefact_grpo")


def test_exp06_cold_start_says_unknown_on_the_least_agreed_share():
    from dataclasses import replace
    cfg = replace(exp06.PRESETS["micro"], unknown_share={"cautious": 0.6, "balanced": 0.3, "bold": 0.0})
    samples = [[f"{a}\nQ: x" for a in "AAAB"],  # top answer's share 0.75
               [f"{a}\nQ: x" for a in "ABCD"],  # 0.25
               [f"{a}\nQ: x" for a in "AABC"],  # 0.5
               ["\nQ: x"] * 4]  # no answer at all: 0.0
    box = exp06.simplefact.synthetic_response
    unknown = [box(["A", "B"], None), box(["A", "B", "C"], None), box(["A", "B", "C"], None),
               box([exp06.simplefact.UNKNOWN], None)]
    answered = [box(["A", "B"], "A"), box(["A", "B", "C"], "A"), box(["A", "B", "C"], "A"), unknown[3]]
    rng = np.random.default_rng(0)
    # ranks 0.75, 0.25, 0.5, 0: cautious abstains below 0.6, balanced below 0.3, bold never (but cannot answer q3)
    assert exp06.cold_start_targets(samples, ["cautious"] * 4, cfg, rng) == [answered[0]] + unknown[1:]
    assert exp06.cold_start_targets(samples, ["balanced"] * 4, cfg, rng) == [answered[0], unknown[1]] + answered[2:]
    assert exp06.cold_start_targets(samples, ["bold"] * 4, cfg, rng) == answered
    # a tie: one of two equally agreed questions abstains, which one drawn at random
    tied = [samples[1], samples[1]]
    cfg = replace(cfg, unknown_share={"balanced": 0.5})
    draws = {tuple(exp06.cold_start_targets(tied, ["balanced"] * 2, cfg, np.random.default_rng(s))) for s in range(8)}
    assert draws == {(unknown[1], answered[1]), (answered[1], unknown[1])}
