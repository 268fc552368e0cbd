"""Exp.3 — RL with PPO on MMLU and TriviaQA under two reward functions (Fig. 3; SPEC.md section 4).

Both start from an SFT model that abstains on a random half (MMLU: "E") or a random 40% (TriviaQA: "I don't
know.") of its finetuning questions, unrelated to familiarity. PPO then rewards +2 correct, -3 wrong, and abstaining
-3 (reward first) or 0 (reward second). The claim: what RL teaches for unfamiliar inputs controls how the model
behaves beyond its knowledge — under reward first it never abstains, under reward second it abstains where it does
not know, and it keeps answering what it knows under both.

    python exp03_rl_abstain/run.py --reward first|second|both [--task mmlu|triviaqa|both] [--scale ...] [--seed N]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (data, evaluation, models, plotting, results, sampling, scales, sft, tasks,  # noqa: E402
                    unfamiliarity)
from common.buckets import Bins, occupied  # noqa: E402
from common.rl import ppo  # noqa: E402
from common.rl.rewards import MALFORMED_REWARD, REWARDS, reward  # noqa: E402

EXPERIMENT = "exp03_rl_abstain"
REWARD_NUMBER = {"first": 1, "second": 2}


@dataclass(frozen=True)
class Exp3Config:
    mmlu_sft: sft.SFTConfig
    triviaqa_sft: sft.SFTConfig
    mmlu_ppo: ppo.PPOConfig
    triviaqa_ppo: ppo.PPOConfig
    lora: models.LoraSettings = field(default_factory=models.LoraSettings)
    abstain_fraction: float = 0.5  # MMLU init: each target independently replaced by "E" (SPEC.md section 4)
    idk_fraction: float = 0.4  # TriviaQA init: a random 40% of the targets are "I don't know."
    mmlu_scoring: str = "letter"
    answer: str = "letter"  # the MMLU answer format, one of tasks.MC_ANSWER_FORMATS
    # How the MMLU PPO prompts end: "comma" as the SFT init and the evaluation ([PROPOSED]), or "newline" as the
    # authors' PPO code did (SPEC.md section 9 item 4)
    mmlu_ppo_prompt: str = "comma"
    # Synthetic scale: the SFT init also trains the rows of the abstention's tokens (models.with_format_tokens), as
    # exp02's SFT does: the world's model never learnt sentence-initial " I" as an output (exp02 README).
    train_format_tokens: bool = False
    nll_bins: tuple[float, ...] = (0, 0.02, 0.5, 1, 1.5, 2)
    triviaqa_scoring: unfamiliarity.QAScoringSettings = field(default_factory=unfamiliarity.QAScoringSettings)
    incorrect_bins: tuple[int, ...] = (1, 3, 5, 7, 9, 11, 13)
    eval_sampling: sampling.SamplingConfig = field(default_factory=lambda: sampling.SamplingConfig(
        max_new_tokens=50, temperature=1.0, batch_size=32))
    eval_batch_size: int = 16
    curve_eval_questions: int = 200  # evaluated every `eval_every` PPO steps for the training curves
    max_eval_questions: int | None = None


PRESETS = {
    # SPEC.md section 4. MMLU: batch 12 (2/GPU x 6), 128 rollouts per process per round, beta 0, figure at step
    # 10000. TriviaQA: batch 30 (10/GPU x 3), beta 0.1, figure at step 30000. SFT inits: MMLU at step 2000 (lr
    # 1e-5 constant, batch 12); TriviaQA at step 1000 (lr 1e-5 cosine, batch 30).
    "paper": Exp3Config(
        mmlu_sft=sft.SFTConfig(lr=1e-5, batch_size=12, total_steps=2000, t_max=10_000, eta_min=1e-5,
                               checkpoint_every=500),
        triviaqa_sft=sft.SFTConfig(lr=1e-5, batch_size=30, total_steps=1000, t_max=10_000, eta_min=1e-10,
                                   checkpoint_every=500),
        mmlu_ppo=ppo.PPOConfig(total_steps=10_000, num_rollouts=768, chunk_size=12, batch_size=12,
                               init_kl_coef=0.0, checkpoint_every=5000, eval_every=1000),
        triviaqa_ppo=ppo.PPOConfig(total_steps=30_000, num_rollouts=384, chunk_size=30, batch_size=30,
                                   init_kl_coef=0.1, checkpoint_every=5000, eval_every=1000)),
    "synthetic": Exp3Config(
        mmlu_sft=sft.SYNTHETIC_SFT,
        triviaqa_sft=replace(sft.SYNTHETIC_SFT, total_steps=1000, t_max=1000),
        # 960 steps: at 480 the mean training reward was still rising (0.27 / 0.22 / 0.48 over the last 60 steps,
        # seeds 0 / 1 / 2) and seed 0 abstained on 0.44 of its most unfamiliar questions; at 960, 0.57 (reward
        # second's margins 0.060 / 0.206 / 0.199; lr 6e-3 at 480 steps instead: 0.54 but familiar_correct 0.67).
        mmlu_ppo=ppo.PPOConfig(lr=3e-3, eta_min=3e-3, cliprange=0.2, total_steps=960, num_rollouts=512,
                               chunk_size=256, batch_size=128, ppo_epochs=4, vf_only_steps=16, init_kl_coef=0.0,
                               max_new_tokens=6, checkpoint_every=320, eval_every=80),
        triviaqa_ppo=ppo.PPOConfig(lr=3e-3, eta_min=3e-3, cliprange=0.2, total_steps=480, num_rollouts=512,
                                   chunk_size=256, batch_size=128, ppo_epochs=4, vf_only_steps=16,
                                   init_kl_coef=0.1, max_new_tokens=12, checkpoint_every=160, eval_every=80),
        mmlu_scoring="cloze", answer="text", train_format_tokens=True,
        nll_bins=(0, 0.05, 0.357, 1.0, 1.4, 2.0),
        triviaqa_scoring=unfamiliarity.QAScoringSettings(max_new_tokens=6, batch_size=64),
        incorrect_bins=(0, 2, 4, 6, 8, 10, 13), eval_batch_size=128,
        eval_sampling=sampling.SamplingConfig(max_new_tokens=12, temperature=1.0, batch_size=256)),
    "micro": Exp3Config(
        mmlu_sft=sft.MICRO_SFT, triviaqa_sft=sft.MICRO_SFT, lora=models.MICRO_LORA,
        mmlu_ppo=ppo.PPOConfig(lr=1e-3, eta_min=1e-3, total_steps=4, num_rollouts=4, chunk_size=4, batch_size=2,
                               ppo_epochs=1, vf_only_steps=2, max_new_tokens=4, checkpoint_every=2, eval_every=2),
        triviaqa_ppo=ppo.PPOConfig(lr=1e-3, eta_min=1e-3, total_steps=4, num_rollouts=4, chunk_size=4,
                                   batch_size=2, ppo_epochs=1, vf_only_steps=2, init_kl_coef=0.1,
                                   max_new_tokens=4, checkpoint_every=2, eval_every=2),
        mmlu_scoring="cloze", answer="text", nll_bins=(0, 0.5, 1.0, 5.0),
        incorrect_bins=(0, 2, 4),
        triviaqa_scoring=unfamiliarity.QAScoringSettings(n_samples=3, max_new_tokens=4, batch_size=32),
        eval_sampling=sampling.SamplingConfig(max_new_tokens=6, temperature=1.0, batch_size=32),
        eval_batch_size=32, curve_eval_questions=4, max_eval_questions=8, train_format_tokens=True),
}


def rl_policy(base: models.Base, cfg: Exp3Config, sft_cfg: sft.SFTConfig, prompts: list[str], targets: list[str],
              formats: list[str], name: str, run, seed: int, resume: bool):
    """The SFT starting point (on the whole finetuning pool, as PPO), merged into a copy of the base weights, with a
    fresh LoRA adapter for PPO (SPEC.md 0.1); and a key naming that starting point. `base.model` comes back
    untouched for the next policy."""
    sft_lora = models.with_format_tokens(cfg.lora, base.tokenizer, formats) if cfg.train_format_tokens else cfg.lora
    model = sft.finetune_lora(base, sft_lora, sft_cfg, prompts, targets, name, run, seed=seed, resume=resume)
    start = models.merged_copy(model)
    base.model = model.unload()
    return models.add_lora(start, cfg.lora, seed=seed), model.adapter_key


def train_policy(policy, init_key: str, tokenizer, prompts: list[str], score, cfg: Exp3Config, task: str,
                 reward_name: str, run, seed: int, resume: bool, evaluate) -> None:
    """PPO with training curves, cached under a key naming everything the cached run depends on: the starting
    point, the PPO settings, the prompts, the reward table and the grader's answer format, and the curve
    evaluations' settings (their results live in the cached history)."""
    name = f"{task}_rl{REWARD_NUMBER[reward_name]}"
    key = (REWARDS[reward_name], MALFORMED_REWARD[task], cfg.answer if task == "mmlu" else "triviaqa",
           cfg.eval_sampling, cfg.eval_batch_size, cfg.curve_eval_questions)
    curves = ppo.train_cached(policy, tokenizer, prompts, score, cfg.mmlu_ppo if task == "mmlu" else cfg.triviaqa_ppo,
                              name, run, seed, init_key, key, resume=resume, evaluate=evaluate)
    plot_curves(curves, name, run.path(f"{name}_curves.png"))


def plot_curves(curves: pd.DataFrame, name: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    columns = [c for c in ("mean_score", "kl", "clipfrac", "vf_loss", "abstain_rate", "correct_rate")
               if c in curves and curves[c].notna().any()]
    with plotting.paper_style(font_size=11):
        fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 2.8), squeeze=False)
        for ax, col in zip(axes[0], columns):
            part = curves[["step", col]].dropna()
            ax.plot(part.step, part[col], "-o" if len(part) < 30 else "-", color="tab:blue", markersize=4)
            ax.set_title(col)
            ax.set_xlabel("PPO step")
        fig.suptitle(name, fontweight="bold")
        plotting.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# MMLU

def run_mmlu(base: models.Base, reward_name: str, cfg: Exp3Config, run, run_args) -> None:
    splits = base.world.mmlu_splits() if base.world is not None else data.load_mmlu()
    pool, eval_questions = splits["finetune"], splits["eval"][: cfg.max_eval_questions]
    with run.stage("mmlu_score_unfamiliarity"):
        nll_eval = unfamiliarity.mmlu_unfamiliarity(base.model, base.tokenizer, base.key, eval_questions,
                                                    data.fewshot_by_subject(splits["fewshot"]),
                                                    scoring=cfg.mmlu_scoring, cache_hits=run.cache_hits)

    # SFT init: the correct option at a random letter; each target independently "E" with probability 1/2.
    rng = np.random.default_rng([run_args.seed, 40])
    positions = rng.integers(4, size=len(pool))
    options = [tasks.place_correct(q, int(p), rng) for q, p in zip(pool, positions)]
    prompts = [tasks.mmlu_sft_prompt(q.question, c) for q, c in zip(pool, options)]
    abstain = rng.random(len(pool)) < cfg.abstain_fraction
    targets = [tasks.ABSTAIN_LETTER if a else tasks.mmlu_sft_answer(c, int(p), cfg.answer)
               for a, c, p in zip(abstain, options, positions)]
    policy, init_key = rl_policy(base, cfg, cfg.mmlu_sft, prompts, targets, [tasks.ABSTAIN_LETTER],
                                 "mmlu_sft_init", run, run_args.seed, run_args.resume)

    def score(idx, texts):
        return [reward(tasks.grade_mc_answer(t, options[i], int(positions[i]), cfg.answer,
                                             allow_abstain=True), reward_name, "mmlu") for i, t in zip(idx, texts)]

    def answer_distribution(questions, nll, gt_letters=tasks.LETTERS[:2]):
        return evaluation.mmlu_answer_distribution(policy, base.tokenizer, questions, nll, cfg.answer,
                                                   cfg.eval_batch_size, np.random.default_rng([run_args.seed, 41]),
                                                   abstain=True, gt_letters=gt_letters)

    def curve_point(step):
        frame = answer_distribution(eval_questions[: cfg.curve_eval_questions], nll_eval)
        return {"abstain_rate": frame.p_E.mean(),
                "correct_rate": np.where(frame["gt"] == "A", frame.p_A, frame.p_B).mean()}

    name = f"mmlu_rl{REWARD_NUMBER[reward_name]}"
    ppo_prompts = [tasks.mmlu_sft_prompt(q.question, c, cfg.mmlu_ppo_prompt) for q, c in zip(pool, options)]
    train_policy(policy, init_key, base.tokenizer, ppo_prompts, score, cfg, "mmlu", reward_name, run,
                 run_args.seed, run_args.resume, curve_point)
    with run.stage(f"evaluate_{name}"):
        tables = evaluation.mmlu_panel_tables(answer_distribution(eval_questions, nll_eval),
                                              Bins(cfg.nll_bins, closed="open"))
    for gt, table in tables.items():
        run.write_csv(f"{name}_gt{gt}.csv", table)
    plotting.letter_panels(tables, f"MMLU Reward Function {REWARD_NUMBER[reward_name]}", run.path(f"{name}.png"),
                           ylabel="Predicted Likelihoods (A-E)")


# ---------------------------------------------------------------------------------------------------------------
# TriviaQA

def run_triviaqa(base: models.Base, reward_name: str, cfg: Exp3Config, run, run_args) -> None:
    splits = base.world.triviaqa_splits() if base.world is not None else data.load_triviaqa()
    pool, eval_questions = splits["finetune"], splits["eval"][: cfg.max_eval_questions]
    with run.stage("triviaqa_score_unfamiliarity"):
        incorrect_eval = unfamiliarity.triviaqa_unfamiliarity(base.model, base.tokenizer, base.key, eval_questions,
                                                              pool, cfg.triviaqa_scoring, seed=run_args.seed,
                                                              cache_hits=run.cache_hits)

    # SFT init: a random 40% of the targets say "I don't know." (Exp.2's distribution 3 as the paper trained it).
    rng = np.random.default_rng([run_args.seed, 50])
    idk = np.zeros(len(pool), dtype=bool)
    idk[rng.choice(len(pool), size=round(cfg.idk_fraction * len(pool)), replace=False)] = True
    prompts = [tasks.triviaqa_sft_prompt(q.question) for q in pool]
    targets = [tasks.triviaqa_target(None if i else q.value) for q, i in zip(pool, idk)]
    policy, init_key = rl_policy(base, cfg, cfg.triviaqa_sft, prompts, targets,
                                 [tasks.IDK, tasks.ANSWER_PREFIX], "triviaqa_sft_init", run, run_args.seed,
                                 run_args.resume)

    def score(idx, texts):
        return [reward(tasks.grade_short_answer(t, pool[i]), reward_name, "triviaqa")
                for i, t in zip(idx, texts)]

    def outcomes(questions, n_incorrect):
        return evaluation.triviaqa_outcomes(policy, base.tokenizer, questions, n_incorrect, cfg.eval_sampling,
                                            seed=run_args.seed)

    def curve_point(step):
        n = cfg.curve_eval_questions
        frame = outcomes(eval_questions[:n], incorrect_eval[:n])
        return {"abstain_rate": frame.idk.mean(), "correct_rate": frame.correct.mean()}

    name = f"triviaqa_rl{REWARD_NUMBER[reward_name]}"
    train_policy(policy, init_key, base.tokenizer, prompts, score, cfg, "triviaqa", reward_name,
                 run, run_args.seed, run_args.resume, curve_point)
    with run.stage(f"evaluate_{name}"):
        frame = outcomes(eval_questions, incorrect_eval)
    run.write_csv(f"{name}_generations.csv", frame)
    bins = Bins(cfg.incorrect_bins, closed="left")
    table = evaluation.triviaqa_table(frame, bins)
    run.write_csv(f"{name}.csv", table)
    if bins.inclusive() is not bins:
        run.write_csv(f"{name}_inclusive.csv", evaluation.triviaqa_table(frame, bins.inclusive()))
    plotting.outcome_figure(table, bins.edges, f"TriviaQA Reward Function {REWARD_NUMBER[reward_name]}",
                            run.path(f"{name}.png"))


# ---------------------------------------------------------------------------------------------------------------
# Claims, from whatever the run folder holds (a run with one reward keeps the other reward's results)

def read_tables(folder: Path, task: str, reward_name: str) -> list[pd.DataFrame]:
    n = REWARD_NUMBER[reward_name]
    paths = [folder / f"mmlu_rl{n}_gt{gt}.csv" for gt in tasks.LETTERS[:2]] if task == "mmlu" else [
        folder / f"triviaqa_rl{n}.csv"]
    return [occupied(pd.read_csv(p)) for p in paths if p.exists()]


def abstain_and_correct(task: str, table: pd.DataFrame, gt: str) -> tuple[pd.Series, pd.Series]:
    """Per bin: the abstention rate and the rate of correct answers."""
    if task == "mmlu":
        return table["p_E_mean"], table[f"p_{gt}_mean"]
    return table["idk_mean"], table["correct_mean"]


def compute_claims(folder: Path) -> list[results.Claim]:
    claims = []
    for task in ("mmlu", "triviaqa"):
        familiar_correct = []
        for reward_name in ("first", "second"):
            tables = read_tables(folder, task, reward_name)
            if not tables:
                continue
            stats = [abstain_and_correct(task, t, gt) for t, gt in zip(tables, tasks.LETTERS)]
            familiar_correct.append(min(correct.iloc[0] for _, correct in stats))
            if reward_name == "first":
                claims.append(results.claim(
                    f"fig3.{task}.first.no_abstain", "reward first: abstention <= 0.10 in every bin (value: the "
                    "largest over bins and panels)", max(a.max() for a, _ in stats), "<=", 0.10))
            else:
                margin = min(min(a.iloc[-1] - 0.5, a.iloc[-1] - a.iloc[0] - 0.3) for a, _ in stats)
                claims.append(results.claim(
                    f"fig3.{task}.second.abstain_last", "reward second: abstention >= 0.5 in the most unfamiliar "
                    "bin and >= 0.3 above the most familiar bin (value: the smaller margin, worst panel)",
                    margin, ">=", 0.0))
        if familiar_correct:
            claims.append(results.claim(
                f"fig3.{task}.familiar_correct", "both rewards: correct >= 0.7 in the most familiar bin (value: the "
                "smallest over the rewards run so far and the panels)", min(familiar_correct), ">=", 0.7))
    return claims


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", default="both", choices=["first", "second", "both"])
    parser.add_argument("--task", default="both", choices=["mmlu", "triviaqa", "both"])
    parser.add_argument("--replicate-kl0-quirk", action="store_true",
                        help="with KL coefficient 0, store old and reference log-probs as 1.0 as the authors' fork "
                             "did (only positive advantages then get a gradient; SPEC.md section 9 item 5)")
    parser.add_argument("--mmlu-ppo-prompt", default="comma", choices=sorted(tasks.MMLU_PROMPT_ENDINGS),
                        help="end the MMLU PPO prompts in ', Answer: ' like the SFT init and the evaluation (default) "
                             "or in '\\nAnswer: ' as the authors' PPO code did (SPEC.md section 9 item 4)")
    scales.add_common_args(parser)
    args, run_args = scales.parse_run_args(EXPERIMENT, parser, argv)
    cfg = replace(PRESETS[run_args.preset_key], mmlu_ppo_prompt=args.mmlu_ppo_prompt)
    if args.replicate_kl0_quirk:
        cfg = replace(cfg, mmlu_ppo=replace(cfg.mmlu_ppo, replicate_kl0_quirk=True),
                      triviaqa_ppo=replace(cfg.triviaqa_ppo, replicate_kl0_quirk=True))
    rewards = ["first", "second"] if args.reward == "both" else [args.reward]
    task_names = ["mmlu", "triviaqa"] if args.task == "both" else [args.task]
    run = results.Run(run_args.out, EXPERIMENT, run_args.scale, run_args.preset, run_args.seed,
                      config=asdict(cfg) | {"rewards": rewards, "tasks": task_names})
    with run.stage("load_base_model"):
        base = models.load_base(run_args.scale, run_args.preset, run_args.seed, cache_hits=run.cache_hits)
    for reward_name in rewards:
        for task in task_names:
            (run_mmlu if task == "mmlu" else run_triviaqa)(base, reward_name, cfg, run, run_args)
    run.write_claims(compute_claims(run.out_dir))
    run.write_manifest()


if __name__ == "__main__":
    main()
