"""Exp.1 — MMLU SFT with two finetuning distributions (Fig. 2, rows 1-2; SPEC.md section 2).

Distribution 1: every example's correct answer at a uniformly random letter. Distribution 2: the same for
familiar questions, but unfamiliar questions have their correct answer moved to B or C. The claim: on unfamiliar
evaluation questions the finetuned model's letter distribution follows the unfamiliar finetuning examples
(uniform for 1, B/C for 2), while familiar questions get the ground-truth letter.

    python exp01_mmlu_sft/run.py [--distribution 1|2|all] [--scale auto|synthetic|paper] [--seed N]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import data, evaluation, models, plotting, results, scales, sft, tasks, unfamiliarity  # noqa: E402
from common.buckets import Bins, occupied  # noqa: E402

EXPERIMENT = "exp01_mmlu_sft"
BOLD_TICKS = {1: (0.25,), 2: (0.0, 0.5)}  # where the unfamiliar end should sit, as the reference figures mark it


@dataclass(frozen=True)
class Exp1Config:
    sft: sft.SFTConfig
    lora: models.LoraSettings = field(default_factory=models.LoraSettings)
    scoring: str = "letter"  # how the base model's unfamiliarity is read (SPEC.md 1.1); the synthetic world uses cloze
    # The finetuned model answers with the letter (SPEC.md section 2); at synthetic scale with the option's text and
    # then its letter. The world model binds letters in context (gate 0.93-1.00) but never answers an item by letter
    # from memory (5-shot letter accuracy at chance in every bin): letter-only SFT on seed 0's world gives the
    # ground truth 0.17-0.37 in the most familiar bin (dist.1; dist.2 0.20-0.32), text then letter 0.86 (README).
    answer: str = "letter"
    nll_bins: tuple[float, ...] = (0, 0.02, 0.5, 1, 1.5, 2)  # strict at both ends (SPEC.md section 2)
    rebalance_dist1: bool = True  # [PROPOSED]; False trains dist.1 on the whole pool, as the authors' code did
    rebalance_dist2: bool = True  # off only for the micro preset, whose untrained world knows nothing
    eval_batch_size: int = 16
    max_eval_questions: int | None = None
    checkpoint: str = "authors"  # the checkpoint rule, one of sft.CHECKPOINT_RULES (--checkpoint)


PRESETS = {
    # SPEC.md section 2: global batch 12, lr 1e-5 constant, figures at checkpoint 2000.
    "paper": Exp1Config(sft=sft.SFTConfig(lr=1e-5, batch_size=12, total_steps=2000, t_max=10_000, eta_min=1e-5,
                                          checkpoint_every=500)),
    "synthetic": Exp1Config(
        sft=sft.SYNTHETIC_SFT,
        # LoRA on every attention projection, not q/v only (SPEC.md 0.1): the world model recalls a fact right after
        # its question but not across the four options, so SFT must reroute attention. Measured on the committed
        # worlds, seeds 0/1/2, dist.2 familiar_gt: q/v 0.648/0.602/0.598, q/k/v/o 0.769/0.695/0.702 (README).
        lora=models.LoraSettings(target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
        scoring="cloze", answer="text_letter", nll_bins=(0, 0.05, 0.357, 1.0, 1.4, 2.0), eval_batch_size=128),
    "micro": Exp1Config(
        sft=sft.MICRO_SFT,
        lora=models.MICRO_LORA, scoring="cloze", answer="text_letter", nll_bins=(0, 0.5, 1.0, 5.0), eval_batch_size=32,
        max_eval_questions=12, rebalance_dist1=False, rebalance_dist2=False),
}


def build_distribution(questions: list[tasks.MCQuestion], familiar: np.ndarray, distribution: int, rebalance: bool,
                       answer: str, rng: np.random.Generator) -> tuple[list[str], list[str], pd.DataFrame]:
    """(prompts, targets, a table of what was built). Rebalancing samples unfamiliar questions with replacement
    down to the familiar count (SPEC.md section 2)."""
    fam_idx = np.flatnonzero(familiar)
    unf_idx = np.flatnonzero(~familiar)
    if rebalance:
        if len(fam_idx) == 0 or len(unf_idx) == 0:
            raise SystemExit("error: cannot rebalance: the finetuning pool has no familiar or no unfamiliar questions")
        unf_idx = rng.choice(unf_idx, size=len(fam_idx), replace=True)
    chosen = np.concatenate([fam_idx, unf_idx])
    prompts, targets, rows = [], [], []
    for i in chosen:
        q = questions[i]
        if distribution == 2 and not familiar[i]:
            position = int(rng.choice([1, 2]))  # B or C
        else:
            position = int(rng.integers(4))
        choices = tasks.place_correct(q, position, rng)
        prompts.append(tasks.mmlu_sft_prompt(q.question, choices))
        targets.append(tasks.mmlu_sft_answer(choices, position, answer))
        rows.append({"familiar": bool(familiar[i]), "target": tasks.LETTERS[position]})
    return prompts, targets, pd.DataFrame(rows)


def first_bin(table: pd.DataFrame) -> pd.Series:
    return occupied(table).iloc[0]


def last_bin(table: pd.DataFrame) -> pd.Series:
    return occupied(table).iloc[-1]


def distribution_claims(distribution: int, tables: dict[str, pd.DataFrame]) -> list[results.Claim]:
    familiar_gt = min(first_bin(t)[f"p_{gt}_mean"] for gt, t in tables.items())
    claims = [results.claim(
        f"fig2.mmlu.dist{distribution}.familiar_gt",
        f"dist.{distribution}: in the most familiar bin the ground-truth letter's mean probability is >= 0.7 "
        "(minimum over the four ground-truth panels)", familiar_gt, ">=", 0.7)]
    if distribution == 1:
        worst = max(abs(last_bin(t)[f"p_{L}_mean"] - 0.25) for t in tables.values() for L in tasks.LETTERS)
        claims.append(results.claim(
            "fig2.mmlu.dist1.unfamiliar_uniform",
            "dist.1: in the most unfamiliar bin every letter's mean probability is within 0.25 +- 0.10 in every "
            "panel (value: the largest deviation from 0.25)", worst, "<=", 0.10))
    else:
        b_c = min(last_bin(t)["p_B_mean"] + last_bin(t)["p_C_mean"] for t in tables.values())
        claims.append(results.claim(
            "fig2.mmlu.dist2.unfamiliar_b_c",
            "dist.2: in the most unfamiliar bin P(B)+P(C) >= 0.75 in every panel, ground truth A and D included "
            "(value: the minimum over panels)", b_c, ">=", 0.75))
    return claims


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--distribution", default="all", choices=["1", "2", "all"])
    parser.add_argument("--unrebalanced-dist1", action="store_true",
                        help="train distribution 1 on the whole pool, as the authors' code did (SPEC.md section 9)")
    scales.add_checkpoint_arg(parser)
    scales.add_common_args(parser)
    args, run_args = scales.parse_run_args(EXPERIMENT, parser, argv)
    cfg = replace(PRESETS[run_args.preset_key], checkpoint=args.checkpoint)
    if args.unrebalanced_dist1:
        cfg = replace(cfg, rebalance_dist1=False)
    distributions = [1, 2] if args.distribution == "all" else [int(args.distribution)]
    run = results.Run(run_args.out, EXPERIMENT, run_args.scale, run_args.preset, run_args.seed,
                      config=asdict(cfg) | {"distributions": distributions})

    with run.stage("load_base_model"):
        base = models.load_base(run_args.scale, run_args.preset, run_args.seed, cache_hits=run.cache_hits)
        splits = base.world.mmlu_splits() if base.world is not None else data.load_mmlu()
        eval_questions = splits["eval"][: cfg.max_eval_questions]
        fewshot = data.fewshot_by_subject(splits["fewshot"])

    with run.stage("score_unfamiliarity"):
        def score(questions):
            return unfamiliarity.mmlu_unfamiliarity(base.model, base.tokenizer, base.key, questions, fewshot,
                                                    scoring=cfg.scoring, cache_hits=run.cache_hits)
        nll_pool, nll_eval = score(splits["finetune"]), score(eval_questions)
        familiar = unfamiliarity.mmlu_is_familiar(nll_pool)
    run.extra["split"] = {"finetune": len(nll_pool), "familiar": int(familiar.sum()), "eval": len(nll_eval)}

    # The finetuning data of each distribution; the uniform checkpoint rule holds a validation split out of the pool.
    pool = splits["finetune"]
    train_idx, val_idx = sft.validation_split(len(pool), cfg.checkpoint, run_args.seed)
    finetuning, built_of = {}, {}
    for distribution in distributions:
        rng = np.random.default_rng([run_args.seed, distribution])
        rebalance = cfg.rebalance_dist1 if distribution == 1 else cfg.rebalance_dist2
        prompts, targets, built_of[distribution] = build_distribution(
            [pool[i] for i in train_idx], familiar[train_idx], distribution, rebalance, cfg.answer, rng)
        validation = build_distribution([pool[i] for i in val_idx], familiar[val_idx], distribution,
                                        rebalance, cfg.answer, rng)[:2] if len(val_idx) else None
        finetuning[f"dist{distribution}"] = ((prompts, targets), validation)
    step = (sft.select_uniform_step(base, cfg.lora, cfg.sft, finetuning, run, run_args.seed, run_args.resume)
            if cfg.checkpoint == "uniform" else cfg.sft.total_steps)
    run.extra["checkpoint_step"] = step

    bins = Bins(cfg.nll_bins, closed="open")
    claims = []
    for distribution in distributions:
        built = built_of[distribution]
        run.extra[f"dist{distribution}_targets"] = {
            group: built[built.familiar == (group == "familiar")].target.value_counts().sort_index().to_dict()
            for group in ("familiar", "unfamiliar")}
        (prompts, targets), _ = finetuning[f"dist{distribution}"]
        model = sft.finetune_lora(base, cfg.lora, cfg.sft, prompts, targets, f"dist{distribution}", run,
                                  seed=run_args.seed, resume=run_args.resume, at_step=step)
        with run.stage(f"evaluate_dist{distribution}"):
            frame = evaluation.mmlu_answer_distribution(
                model, base.tokenizer, eval_questions, nll_eval, cfg.answer, cfg.eval_batch_size,
                np.random.default_rng([run_args.seed, 10 + distribution]))
            base.model = model.unload()  # back to the untouched base for the next distribution
        tables = evaluation.mmlu_panel_tables(frame, bins)
        for gt, table in tables.items():
            run.write_csv(f"mmlu_sft{distribution}_gt{gt}.csv", table)
        plotting.letter_panels(tables, f"MMLU Finetuning Distribution {distribution}",
                               run.path(f"mmlu_sft{distribution}.png"), bold_ticks=BOLD_TICKS[distribution])
        claims += distribution_claims(distribution, tables)

    run.write_claims(claims)
    run.write_manifest()


if __name__ == "__main__":
    main()
