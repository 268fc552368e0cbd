"""Subprocess smoke runs of every entry point at --preset micro (seconds each; no claim is expected to hold)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_module(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args, "--preset", "micro", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_world_entry_point_writes_familiarity(tmp_path):
    proc = run_module(["-m", "common.world", "--scale", "synthetic", "--seed", "0"], tmp_path)
    assert proc.stdout.splitlines()[0].startswith("scale: synthetic")
    table = pd.read_csv(tmp_path / "familiarity.csv")
    assert list(table.columns) == ["exposure_bin", "n_entities", "qa_accuracy", "qa_t1_accuracy", "mc_accuracy",
                                   "letter_accuracy", "item_recall_accuracy", "verify_separation",
                                   "rm_probe_separation"]
    assert table.exposure_bin.iloc[0] == "0"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["cache_hits"]["world"] is False
    assert {"build_or_load_world", "measure_in_context_skills", "measure_knowledge"} <= set(manifest["timings_s"])
    assert set(manifest["in_context"]) == {"induction", "equality_separation", "letter_binding"}
    claims = [c["id"] for c in json.loads((tmp_path / "claims.json").read_text())["claims"]]
    assert {"world.letter_binding", "world.item_recall_most_exposed", "world.rm_probe_separation"} <= set(claims)
    assert (tmp_path / "familiarity.png").stat().st_size > 0


def test_exp01_micro_run_writes_panels_claims_and_resumes_from_cache(tmp_path):
    run_module(["exp01_mmlu_sft/run.py", "--scale", "synthetic"], tmp_path)
    claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
    assert [c["id"] for c in claims] == ["fig2.mmlu.dist1.familiar_gt", "fig2.mmlu.dist1.unfamiliar_uniform",
                                         "fig2.mmlu.dist2.familiar_gt", "fig2.mmlu.dist2.unfamiliar_b_c"]
    for d in (1, 2):
        assert (tmp_path / f"mmlu_sft{d}.png").exists()
        for gt in "ABCD":
            panel = pd.read_csv(tmp_path / f"mmlu_sft{d}_gt{gt}.csv")
            assert {"count", "x_mean", "p_A_mean", "p_D_std"} <= set(panel.columns)
    # a second run finds the SFT adapters in the cache instead of training again
    run_module(["exp01_mmlu_sft/run.py", "--scale", "synthetic"], tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["cache_hits"]["sft_dist1"] and manifest["cache_hits"]["sft_dist2"]


def test_exp01_uniform_checkpoint_rule_reads_both_distributions_at_one_validated_step(tmp_path):
    run_module(["exp01_mmlu_sft/run.py", "--scale", "synthetic", "--checkpoint", "uniform"], tmp_path)
    selection = pd.read_csv(tmp_path / "checkpoint_selection.csv")
    assert list(selection.columns) == ["step", "dist1", "dist2", "chosen"] and selection.step.tolist() == [2, 4]
    chosen = selection[selection.chosen]
    assert len(chosen) == 1
    assert (chosen.dist1 + chosen.dist2).iloc[0] == (selection.dist1 + selection.dist2).min()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["checkpoint_step"] == chosen.step.iloc[0] and manifest["config"]["checkpoint"] == "uniform"
    assert len(json.loads((tmp_path / "claims.json").read_text())["claims"]) == 4


def test_exp02_micro_run_writes_bars_and_claims(tmp_path):
    run_module(["exp02_triviaqa_sft/run.py", "--scale", "synthetic"], tmp_path)
    claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
    assert [c["id"] for c in claims] == [
        "fig2.triviaqa.dist1.incorrect_rises", "fig2.triviaqa.dist1.no_idk", "fig2.triviaqa.dist2.idk_last",
        "fig2.triviaqa.dist2.idk_first_low", "fig2.triviaqa.dist3.idk_flat", "fig2.triviaqa.dist3.incorrect_rises"]
    for d in (1, 2, 3):
        table = pd.read_csv(tmp_path / f"triviaqa_sft{d}.csv")
        shown = table[table["count"] > 0]
        total = shown.correct_mean + shown.idk_mean + shown.incorrect_mean
        assert total.round(6).eq(1.0).all()  # the three outcomes partition every bin
        assert (tmp_path / f"triviaqa_sft{d}.png").exists()
        # the micro bins start at 1 incorrect sample, as the paper's: the inclusive variant counts every question
        assert pd.read_csv(tmp_path / f"triviaqa_sft{d}_inclusive.csv")["count"].sum() == 12
        generations = pd.read_csv(tmp_path / f"triviaqa_sft{d}_generations.csv")
        assert len(generations) == 24 and set(generations["sample"]) == {0, 1}  # the micro preset's 2 per question


def test_exp03_micro_run_trains_both_tasks_and_keeps_the_other_rewards_results(tmp_path):
    proc = run_module(["exp03_rl_abstain/run.py", "--scale", "synthetic", "--reward", "first"], tmp_path)
    assert proc.stderr.count("stage load_base_model done") == 1  # one base serves both tasks' policies
    claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
    assert [c["id"] for c in claims] == ["fig3.mmlu.first.no_abstain", "fig3.mmlu.familiar_correct",
                                         "fig3.triviaqa.first.no_abstain", "fig3.triviaqa.familiar_correct"]
    panel = pd.read_csv(tmp_path / "mmlu_rl1_gtA.csv")
    assert {"p_A_mean", "p_E_mean", "p_E_std"} <= set(panel.columns)
    curves = pd.read_csv(tmp_path / "triviaqa_rl1_curves.csv")
    assert {"mean_score", "kl", "clipfrac", "vf_loss", "abstain_rate"} <= set(curves.columns)
    assert curves.abstain_rate.notna().sum() == 3  # at the start, then every 2 of 4 steps
    run_module(["exp03_rl_abstain/run.py", "--scale", "synthetic", "--reward", "second", "--task", "mmlu"],
               tmp_path)
    ids = [c["id"] for c in json.loads((tmp_path / "claims.json").read_text())["claims"]]
    assert ids == ["fig3.mmlu.first.no_abstain", "fig3.mmlu.second.abstain_last", "fig3.mmlu.familiar_correct",
                   "fig3.triviaqa.first.no_abstain", "fig3.triviaqa.familiar_correct"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["cache_hits"]["sft_mmlu_sft_init"]  # the SFT starting point is shared by both rewards
    for name in ("mmlu_rl1", "mmlu_rl2", "triviaqa_rl1"):
        assert (tmp_path / f"{name}.png").exists() and (tmp_path / f"{name}_curves.png").exists()


def test_exp04_micro_run_writes_reward_curves_and_keeps_the_other_tasks_claims(tmp_path):
    run_module(["exp04_reward_models/run.py", "--scale", "synthetic", "--task", "triviaqa"], tmp_path)
    table = pd.read_csv(tmp_path / "triviaqa_rm1.csv")
    assert {"count", "x_mean", "p_right_mean", "p_right_std", "p_wrong_mean", "p_wrong_std"} <= set(table.columns)
    predictions = pd.read_csv(tmp_path / "triviaqa_rm2_predictions.csv")
    assert predictions.p_right.between(0, 1).all() and len(predictions) == 12
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["cache_hits"]["unfamiliarity_triviaqa-incorrect-answers"] is False
    run_module(["exp04_reward_models/run.py", "--scale", "synthetic", "--task", "mmlu", "--distribution", "1",
                "--composition", "authors"], tmp_path)
    ids = [c["id"] for c in json.loads((tmp_path / "claims.json").read_text())["claims"]]
    assert ids == ["fig4.mmlu.dist1.overestimate", "fig4.mmlu.dist1.familiar_separates",
                   "fig4.triviaqa.dist1.overestimate", "fig4.triviaqa.dist1.familiar_separates",
                   "fig4.triviaqa.dist2.underestimate", "fig4.triviaqa.dist2.familiar_separates"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["authors_composition"] is True
    for name in ("mmlu_rm1", "triviaqa_rm1", "triviaqa_rm2"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0


EXP06_CLAIMS = ["simplefact.eval_reward_rises", "simplefact.all_wrong_falls", "simplefact.partial_correct_drops",
                "simplefact.filter_informative", "simplefact.caution_vs_fact", "simplefact.frontier"]


def test_exp06_micro_run_writes_every_setting_and_the_figures(tmp_path):
    run_module(["exp06_simplefact_grpo/run.py", "--scale", "synthetic"], tmp_path)
    claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
    assert [c["id"] for c in claims] == EXP06_CLAIMS
    for setting in ("fact", "caution", "both", "fact-then-caution"):
        table = pd.read_csv(tmp_path / f"decomposition_{setting}.csv")
        columns = ["All Correct", "Partial Correct", "Partial NotAttempt", "All NotAttempt", "All Attempt and Wrong"]
        assert table[columns].sum(axis=1).round(6).eq(100).all() and table.step.tolist() == [0, 1, 2]
    assert "### Setting: both" in (tmp_path / "decomposition.md").read_text()
    tradeoff = pd.read_csv(tmp_path / "tradeoff.csv")
    assert tradeoff.policy.tolist() == ["cold start"] * 3 + [f"RL ({s})" for s in
                                                             ("fact", "caution", "both", "fact-then-caution")]
    for name in ("reward_curves.png", "tradeoff.png", "settings.png"):
        assert (tmp_path / name).stat().st_size > 0


def tiny_chat_model(folder):
    """A randomly initialised Qwen2 with a word-level tokenizer and a ChatML template: the paper path's shape."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from common import simplefact, world

    texts = [simplefact.SYSTEM_PROMPT, "<|im_start|>system user assistant\n<|im_end|>", "Candidates: x. Unknown"]
    for name in ("simpleqa", "popqa", "selfaware"):
        texts += (ROOT / "tests/fixtures/simplefact" / name).glob("*.jsonl").__next__().read_text().splitlines()
    tok = world.build_tokenizer(texts + world.FORMAT_TEXTS)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(folder)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    Qwen2ForCausalLM(config).save_pretrained(folder)


def test_exp06_paper_path_micro_run_on_a_chat_model_and_the_four_sources(tmp_path):
    tiny_chat_model(tmp_path / "model")
    run_module(["exp06_simplefact_grpo/run.py", "--scale", "paper", "--allow-cpu", "--setting", "both",
                "--model", str(tmp_path / "model"), "--data", str(ROOT / "tests/fixtures/simplefact")],
               tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["scale"] == "paper" and "cold_start" not in str(manifest["timings_s"])
    table = pd.read_csv(tmp_path / "out" / "decomposition_both.csv")
    assert table.step.tolist() == [0, 1, 2]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun (torch's launcher) is not on PATH")
def test_exp06_round1_sharded_under_two_processes(tmp_path):
    """Round 1's launch (`--shard`: the policy in FSDP2 across the processes), on the tiny chat model and 2 CPU
    processes: GRPO trains, checkpoints once per step and the results are written."""
    tiny_chat_model(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "UNFAMILIAR_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "exp06_simplefact_grpo/run.py",
                           "--scale", "paper", "--allow-cpu", "--setting", "both", "--shard", "--no-full-finetune",
                           "--model", str(tmp_path / "model"), "--data", str(ROOT / "tests/fixtures/simplefact"),
                           "--preset", "micro", "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["grpo"]["shard"] is True
    assert pd.read_csv(tmp_path / "out" / "decomposition_both.csv").step.tolist() == [0, 1, 2]
    (run,) = (tmp_path / "cache" / "grpo").iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-000001", "checkpoint-000002"]


def test_exp06_shard_needs_one_setting(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "exp06_simplefact_grpo/run.py", "--scale", "synthetic", "--shard",
                           "--preset", "micro", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: --shard trains one")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the paper scale runs for real")
def test_paper_scale_without_cuda_stops_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "exp02_triviaqa_sft/run.py", "--scale", "paper", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: ") and "--allow-cpu" in proc.stderr and "Traceback" not in proc.stderr


def test_exp05_micro_run_labels_responses_compares_the_reward_models_and_trains_ppo_on_them(tmp_path):
    run_module(["exp05_longform_conservative_rm/run.py", "--scale", "synthetic"], tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    # the micro world's SFT model writes no fact, so only the standard reward model (its writer's facts) trains
    assert {"bio_unfamiliarity", "plot_evaluate_sft", "plot_sample_sft", "sft_bio_decomposer", "sft_bio_rm_standard",
            "plot_rm_standard_predict", "ppo_bio_rl_standard", "plot_evaluate_rl_standard"} <= set(manifest["timings_s"])
    assert "ppo_bio_rl_conservative" not in manifest["timings_s"]
    assert manifest["bio_rm_standard_facts"]["n"] > 0 and manifest["bio_rm_conservative_facts"]["n"] == 0
    claims = {c["id"]: c for c in json.loads((tmp_path / "claims.json").read_text())["claims"]}
    assert list(claims) == [f"{kind}.{task}.{name}" for task in ("bio", "plot") for kind, name in (
        ("fig5", "standard_overestimates"), ("fig5", "conservative_below_standard"), ("table", "order"),
        ("fig7", "fewer_false"))]
    assert claims["fig7.bio.fewer_false"]["value"] is None and not claims["fig7.bio.fewer_false"]["passed"]
    fractions = pd.read_csv(tmp_path / "table_fraction_true.csv").set_index("task")
    for task in ("bio", "plot"):
        frame = pd.read_csv(tmp_path / f"{task}_sft_responses.csv")
        assert 0 < len(frame) <= 8 and frame.unfamiliarity.between(0, 4).all()  # max_eval_items 8
        assert (frame.frac_true[~frame.valid] == 0).all()  # invalid responses score 0 (the notebook's rule)
        rl = pd.read_csv(tmp_path / f"{task}_rl_standard_responses.csv")
        assert rl.topic.tolist() == frame.topic.tolist()
        assert fractions.loc[task, "rl_standard"] == pytest.approx(rl.frac_true.mean())
        table = pd.read_csv(tmp_path / f"{task}_facts.csv")
        assert set(table.method) == {"sft", "rl_standard"}  # no conservative RM, no policy trained with it
        assert not (tmp_path / f"{task}_rl_conservative_responses.csv").exists()
        assert (table.groupby("method")["count"].sum() == len(frame)).all()
        assert {"n_true_mean", "n_false_mean", "frac_true_mean"} <= set(table.columns)
        curves = pd.read_csv(tmp_path / f"{task}_rl_standard_curves.csv")
        assert curves.step.max() == 4 and curves.eval_frac_true.notna().sum() == 3  # steps 0, 2, 4
        predictions = pd.read_csv(tmp_path / f"{task}_rm_predictions.csv")
        assert (predictions.true_reward == 2 * predictions.n_true - 3 * predictions.n_false).where(
            predictions.valid, predictions.true_reward == -15).all()
        # the standard reward model judges only the response's own facts; the conservative one had no data
        assert (predictions.standard_reward - 2 * (predictions.n_true + predictions.n_false)).where(
            predictions.valid, 0).le(0).all() and predictions.conservative_reward.isna().all()
        assert (tmp_path / f"{task}_rewards.png").exists()
        assert {"true_reward_mean", "standard_reward_mean"} <= set(pd.read_csv(tmp_path / f"{task}_rewards.csv"))
    fig8 = pd.read_csv(tmp_path / "fig8_responses.csv")
    assert len(fig8) == 3 and set(fig8.method) == {"sft"} and fig8.topic.nunique() == 3
    assert (tmp_path / "fig7_facts.png").exists() and (tmp_path / "fig8_responses.png").exists()
