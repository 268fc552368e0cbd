"""The reward model (P(reward 1) from the "True"/"False" logits), its prompts, the incorrect answers it learns
from, and exp04's data and claims, checked by hand."""
import dataclasses

import numpy as np
import pandas as pd
import pytest

from common import results, reward_model, sft, tasks, unfamiliarity
from conftest import last_token_model, tiny_llama
from test_experiments import MC, QA, load_run

exp04 = load_run("exp04_reward_models")


@pytest.fixture
def rm_tokenizer():
    from common.world import build_tokenizer

    return build_tokenizer(["Q: Where was Velorin born?\nA: Paris\n True False", "A) B) C) D) , Answer: Rome"])


def test_rm_prompts():
    assert tasks.mmlu_rm_prompt("Q?", ("a", "b", "c", "d"), "C") == "Q? A) a B) b C) c D) d , Answer: C\n"
    assert tasks.mmlu_rm_prompt("Q?", ("a", "b", "c", "d"), "c", options=False) == "Q: Q?\nA: c\n"
    assert tasks.triviaqa_rm_prompt("Who?", "The Beatles!") == "Q: Who?\nA: beatles\n"
    assert tasks.triviaqa_rm_prompt("Who?", "The Beatles!", normalize=False) == "Q: Who?\nA: The Beatles!\n"


def test_predict_is_the_softmax_of_true_and_false_at_the_last_position(rm_tokenizer):
    # After "\n" the logits of " True" and " False" are 2 and 0, after " Rome" they are 0 and 1; other tokens'
    # logits (0 here) must not enter the softmax.
    model = last_token_model(rm_tokenizer, {"\n": 0, " Rome": 1},
                             {(0, " True"): 2.0, (0, " False"): 0.0, (1, " True"): 0.0, (1, " False"): 1.0})
    p = reward_model.predict(model, rm_tokenizer, ["Q: Where was Velorin born?\nA: Paris\n",
                                                   "Q: Where was Velorin born?\nA: Rome"], batch_size=2)
    assert p == pytest.approx([1 / (1 + np.exp(-2)), 1 / (1 + np.exp(1))], abs=1e-5)
    with pytest.raises(ValueError, match="0 or 1"):
        reward_model.targets([1, 2])


def test_recall_then_judge_targets_write_the_recalled_answer_then_the_verdict():
    assert reward_model.targets([1, 0]) == ["True", "False"]
    assert reward_model.targets([1, 0], recalled=["Paris", "Paris"]) == ["Paris? True", "Paris? False"]
    with pytest.raises(ValueError, match="one recalled answer per reward"):
        reward_model.targets([1, 0], recalled=["Paris"])
    assert reward_model.targets([1, 0], words={1: "Yes.", 0: "No."}) == ["Yes.", "No."]  # exp05's paper prompts


def test_recall_then_judge_reads_the_verdict_after_the_greedy_recall():
    from common.world import build_tokenizer

    tok = build_tokenizer(["Q: Where was Velorin born?\nA: Rome\n Paris? True False"])
    # After "\n": " Paris" (and, among the verdicts, False by 3 nats); after " Paris": "?"; after "?": True by 2
    # nats. After " Rome" the model repeats " Rome", never closing its recall: a "?" is appended.
    model = last_token_model(tok, {"\n": 0, " Paris": 1, "?": 2, " Rome": 3},
                             {(0, " Paris"): 30.0, (0, " False"): 3.0, (1, "?"): 30.0, (2, " True"): 2.0,
                              (3, " Rome"): 30.0})
    prompts = ["Q: Where was Velorin born\nA: Rome\n", "Q: Where was Velorin born\nA: Rome"]
    direct = reward_model.predict(model, tok, prompts[:1])
    recall = reward_model.predict(model, tok, prompts, reward_format="recall")
    assert direct == pytest.approx([1 / (1 + np.exp(3))], abs=1e-5)
    assert recall == pytest.approx([1 / (1 + np.exp(-2))] * 2, abs=1e-5)
    with pytest.raises(ValueError, match="unknown reward-model format"):
        reward_model.predict(model, tok, prompts, reward_format="scalar")


def test_recall_candidate_reads_the_probability_of_recalling_the_candidate_then_approving_it():
    from common.world import build_tokenizer

    tok = build_tokenizer(["Q: Where was Velorin born?\nA: Rome\n Paris? True False"])
    # After "\n" the recall is " Paris" or " Rome" (logits 1 and 0 of a vocabulary of V tokens at 0 otherwise);
    # after either, "?" (logit 30, probability ~1); after "?", " True" by 2 nats over " False" (the rest at 0).
    model = last_token_model(tok, {"\n": 0, " Paris": 1, " Rome": 1, "?": 2},
                             {(0, " Paris"): 1.0, (1, "?"): 30.0, (2, " True"): 2.0})
    v = len(tok)
    p_rome = 1 / (np.e + v - 1)  # " Rome" after "\n"
    p_true = np.exp(2) / (np.exp(2) + v - 1)  # " True" after "?"
    prompts = ["Q: Where was Velorin born?\nA: Rome\n"] * 2
    p = reward_model.predict(model, tok, prompts, reward_format="recall_candidate", candidates=["Rome", "Paris"])
    assert p == pytest.approx([p_rome * p_true, np.e * p_rome * p_true], rel=1e-4)
    # the greedy recall writes " Paris" for both, so it cannot tell the two candidates apart
    greedy = reward_model.predict(model, tok, prompts, reward_format="recall")
    assert greedy[0] == pytest.approx(greedy[1])
    with pytest.raises(ValueError, match="one candidate answer per prompt"):
        reward_model.predict(model, tok, prompts, reward_format="recall_candidate")


def test_training_makes_the_reward_model_follow_its_labels(rm_tokenizer, tmp_path):
    from common import models

    base = models.Base(model=tiny_llama(rm_tokenizer, hidden=16, init_std=0.3), tokenizer=rm_tokenizer,
                       key="tiny")
    prompts = ["Q: Where was Velorin born?\nA: Paris\n", "Q: Where was Velorin born?\nA: Rome\n"]

    cfg = sft.SFTConfig(lr=3e-2, batch_size=2, total_steps=60, t_max=60, eta_min=3e-2, checkpoint_every=60)
    run = results.Run(tmp_path, "exp04", "synthetic", "micro", 0)
    model = reward_model.train(base, models.LoraSettings(r=4, alpha=8), cfg, prompts, [1, 0], "rm", run, seed=0)
    p = reward_model.predict(model, rm_tokenizer, prompts)
    assert p[0] > 0.9 and p[1] < 0.1


def test_incorrect_answers_take_the_first_wrong_sample_and_search_further_rounds(monkeypatch):
    questions = [tasks.QAQuestion("Where?", "a", "Paris", ("City of Light",)), tasks.QAQuestion("When?", "b", "1950")]
    rounds = iter([
        [["Paris", " the city of light", "", " Rome\n\nQ: x", "Oslo"], ["1950"] * 5],  # round 1: "b" only right
        [["1950", " 1951 </s>", "1952", "1950", "1950"]],  # round 2 samples only the question still open
    ])
    monkeypatch.setattr(unfamiliarity, "fewshot_samples", lambda model, tok, qs, pool, settings, seed: next(rounds))
    answers = unfamiliarity.sample_incorrect_answers(None, None, questions, [], unfamiliarity.QAScoringSettings(),
                                                     seed=0, max_rounds=3)
    assert answers == ["Rome", "1951"]
    rounds = iter([[["Paris"]], [["Paris"]]])
    assert unfamiliarity.sample_incorrect_answers(None, None, questions[:1], [], unfamiliarity.QAScoringSettings(),
                                                  seed=0, max_rounds=2) == [""]


def test_text_scores_round_trip_through_the_cache():
    calls = []

    def compute():
        calls.append(1)
        return ["Rome", "", "NA"]

    for _ in range(2):
        out = unfamiliarity.cached_scores("t", "m", ["a", "b", "c"], {}, compute, dtype=str)
        assert out.tolist() == ["Rome", "", "NA"]  # "" and "NA" stay strings, never NaN
    assert len(calls) == 1


def test_composition_paper_and_authors():
    fam, unf = np.array([0, 1, 2, 3]), np.array([7, 8, 8, 9])
    rows = exp04.composition(fam, unf, 1, False, np.random.default_rng(0))
    assert rows.question.tolist() == [0, 1, 2, 3, 7, 8, 8, 9]
    assert sorted(rows[rows.familiar].reward) == [0, 0, 1, 1] and (rows[~rows.familiar].reward == 1).all()
    rows = exp04.composition(fam, unf, 2, True, np.random.default_rng(0))
    assert rows.question.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 7, 8, 8, 9]
    assert rows.reward.tolist() == [1, 0] * 4 + [0] * 4 and rows.familiar.sum() == 8


# the synthetic preset's formats with the paper's composition (each question once)
PAPER_COMPOSITION = dataclasses.replace(exp04.PRESETS["synthetic"], authors_composition=False)


@pytest.mark.parametrize("options", [True, False])
def test_mmlu_examples_name_the_right_or_a_wrong_option(options):
    familiar = np.array([True] * 3 + [False] * 7)
    cfg = dataclasses.replace(PAPER_COMPOSITION, mmlu_options=options)
    prompts, rows = exp04.mmlu_examples(MC, familiar, 2, cfg, np.random.default_rng(0))
    assert len(prompts) == 6 and rows.familiar.sum() == 3  # unfamiliar resampled down to the familiar count
    for p, (i, reward) in zip(prompts, zip(rows.question, rows.reward)):
        candidate = p.split(", Answer: " if options else "\nA: ")[1].removesuffix("\n")
        assert (candidate == f"right{i}") == bool(reward)
        assert (f") {candidate} " in p) == options and p.startswith(MC[i].question if options else "Q: ")
    assert (rows[~rows.familiar].reward == 0).all()


def test_a_prompt_without_options_refuses_letter_candidates():
    with pytest.raises(ValueError, match="without its options"):
        dataclasses.replace(exp04.PRESETS["synthetic"], mmlu_answer="letter")


def test_triviaqa_examples_balance_groups_and_skip_questions_without_a_wrong_answer():
    unfamiliar = np.array([False] * 6 + [True] * 4)
    wrong = np.array(["w0", "", "w2", "w3", "w4", "w5", "w6", "w7", "", "w9"], dtype=object)
    prompts, rows = exp04.triviaqa_examples(QA, unfamiliar, wrong, 1, PAPER_COMPOSITION,
                                            np.random.default_rng(0))
    assert rows.familiar.sum() == 3 and (~rows.familiar).sum() == 3  # min(5 usable familiar, 3 usable unfamiliar)
    assert not set(rows.question) & {1, 8}
    for p, i, reward in zip(prompts, rows.question, rows.reward):
        assert p == f"Q: q{i}?\nA: {f'v{i}' if reward else f'w{i}'}\n"
    assert (rows[~rows.familiar].reward == 1).all()


def test_exp04_claims_from_hand_made_tables(tmp_path):
    def table(right, wrong):
        return pd.DataFrame({"count": [10, 0, 10], "p_right_mean": [right[0], np.nan, right[1]],
                             "p_wrong_mean": [wrong[0], np.nan, wrong[1]]})
    table((0.95, 0.9), (0.1, 0.8)).to_csv(tmp_path / "mmlu_rm1.csv", index=False)
    table((0.9, 0.2), (0.05, 0.02)).to_csv(tmp_path / "triviaqa_rm2.csv", index=False)
    c = {x.id: x for x in exp04.compute_claims(tmp_path)}
    assert list(c) == ["fig4.mmlu.dist1.overestimate", "fig4.mmlu.dist1.familiar_separates",
                       "fig4.triviaqa.dist2.underestimate", "fig4.triviaqa.dist2.familiar_separates"]
    assert c["fig4.mmlu.dist1.overestimate"].value == pytest.approx(0.1)  # min(0.3 - 0.1, 0.8 - 0.7)
    assert c["fig4.mmlu.dist1.familiar_separates"].value == pytest.approx(0.85)
    assert c["fig4.triviaqa.dist2.underestimate"].value == pytest.approx(0.1)  # min(0.9 - 0.7, 0.3 - 0.2)
    assert c["fig4.triviaqa.dist2.familiar_separates"].value == pytest.approx(0.85)
