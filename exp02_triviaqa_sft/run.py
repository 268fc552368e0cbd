"""Exp.2 — TriviaQA SFT with three finetuning distributions (Fig. 2, row 3; SPEC.md section 3).

Distribution 1: every target is "The answer is X.". Distribution 2: unfamiliar questions (more than 6 of 12
few-shot base-model samples incorrect) get "I don't know." instead. Distribution 3: a random subset of the same
size gets "I don't know.". The claim: the finetuned model says "I don't know." on unfamiliar evaluation questions
only when the unfamiliar finetuning examples taught it to (distribution 2), not when IDK was unrelated to
familiarity (distribution 3, flat IDK) or absent (distribution 1, wrong answers grow with unfamiliarity).

    python exp02_triviaqa_sft/run.py [--distribution 1|2|3|all] [--scale auto|synthetic|paper] [--seed N]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import data, evaluation, models, plotting, results, sampling, scales, sft, tasks, unfamiliarity  # noqa: E402
from common.buckets import Bins, occupied  # noqa: E402

EXPERIMENT = "exp02_triviaqa_sft"


@dataclass(frozen=True)
class Exp2Config:
    sft: sft.SFTConfig
    lora: models.LoraSettings = field(default_factory=models.LoraSettings)
    scoring: unfamiliarity.QAScoringSettings = field(default_factory=unfamiliarity.QAScoringSettings)
    # Bins on the number of incorrect samples (of 12), familiar -> unfamiliar, left-closed. The paper's bins
    # [0,2),...,[10,12) on #correct drop the 12/12-correct questions; (1, 3, ..., 13) on #incorrect reproduces them.
    incorrect_bins: tuple[int, ...] = (1, 3, 5, 7, 9, 11, 13)
    eval_sampling: sampling.SamplingConfig = field(default_factory=lambda: sampling.SamplingConfig(
        max_new_tokens=50, temperature=1.0, batch_size=32))  # EOS ends a sample; graders strip " </s>"
    max_eval_questions: int | None = None
    # Synthetic scale: SFT also trains the rows of the targets' tokens (models.with_format_tokens). Measured on the
    # capable world, seed 0: without them dist.2 never says IDK (0.00 in every bin; the model writes a name, then
    # "don't know."); with them IDK is 0.84 in the most unfamiliar bin and 0.04 in the most familiar.
    train_format_tokens: bool = False
    checkpoint: str = "authors"  # the checkpoint rule, one of sft.CHECKPOINT_RULES (--checkpoint)


PRESETS = {
    # SPEC.md section 3: lr 1e-5, cosine T_max 1e4 to 1e-10, batch 30 (3 GPUs x 10), figures at step 10000.
    "paper": Exp2Config(sft=sft.SFTConfig(lr=1e-5, batch_size=30, total_steps=10_000, t_max=10_000, eta_min=1e-10,
                                          checkpoint_every=1000)),
    "synthetic": Exp2Config(
        sft=sft.SYNTHETIC_SFT,
        scoring=unfamiliarity.QAScoringSettings(max_new_tokens=6, batch_size=64),
        incorrect_bins=(0, 2, 4, 6, 8, 10, 13),
        # Synthetic scale draws 8 samples per evaluation question where the paper draws one (SPEC.md 3): its 915
        # evaluation questions leave 13-67 in each middle bin, whose binomial noise alone (about 0.1) put dist.3's
        # IDK spread at 0.28 / 0.18 / 0.21 on seeds 0-2 although the populous bins agree (0.28-0.30); with 8 samples
        # (chosen on seeds 0 and 1) 0.10 / 0.09 / 0.15. The paper's bins hold over 1,000 questions each.
        eval_sampling=sampling.SamplingConfig(max_new_tokens=12, temperature=1.0, num_samples=8, batch_size=64),
        train_format_tokens=True),
    "micro": Exp2Config(
        sft=sft.MICRO_SFT,
        lora=models.MICRO_LORA,
        scoring=unfamiliarity.QAScoringSettings(n_samples=3, max_new_tokens=4, batch_size=32),
        # starting at 1 as the paper's bins do, so the smoke run writes the inclusive variant too
        incorrect_bins=(1, 2, 4), max_eval_questions=12,
        eval_sampling=sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=2, batch_size=32)),
}


def build_distribution(questions: list[tasks.QAQuestion], unfamiliar: np.ndarray, distribution: int,
                       rng: np.random.Generator) -> tuple[list[str], list[str], np.ndarray]:
    """(prompts, targets, which examples say IDK). Distribution 3 relabels a uniformly random subset exactly as
    large as distribution 2's unfamiliar set (the paper's matched ratio)."""
    if distribution == 1:
        idk = np.zeros(len(questions), dtype=bool)
    elif distribution == 2:
        idk = unfamiliar.copy()
    else:
        idk = np.zeros(len(questions), dtype=bool)
        idk[rng.choice(len(questions), size=int(unfamiliar.sum()), replace=False)] = True
    prompts = [tasks.triviaqa_sft_prompt(q.question) for q in questions]
    targets = [tasks.triviaqa_target(None if i else q.value) for q, i in zip(questions, idk)]
    return prompts, targets, idk


def distribution_claims(distribution: int, table: pd.DataFrame) -> list[results.Claim]:
    t = occupied(table)
    first, last = t.iloc[0], t.iloc[-1]
    rise = last.incorrect_mean - first.incorrect_mean
    d = f"fig2.triviaqa.dist{distribution}"
    if distribution == 1:
        return [results.claim(f"{d}.incorrect_rises", "dist.1: the incorrect rate rises by >= 0.4 from the most "
                              "familiar to the most unfamiliar bin", rise, ">=", 0.4),
                results.claim(f"{d}.no_idk", "dist.1: IDK <= 0.05 in every bin (value: the largest)",
                              t.idk_mean.max(), "<=", 0.05)]
    if distribution == 2:
        return [results.claim(f"{d}.idk_last", "dist.2: IDK >= 0.5 in the most unfamiliar bin", last.idk_mean, ">=", 0.5),
                results.claim(f"{d}.idk_first_low", "dist.2: IDK <= 0.15 in the most familiar bin", first.idk_mean,
                              "<=", 0.15)]
    return [results.claim(f"{d}.idk_flat", "dist.3: IDK spread across bins (max - min) <= 0.15",
                          t.idk_mean.max() - t.idk_mean.min(), "<=", 0.15),
            results.claim(f"{d}.incorrect_rises", "dist.3: the incorrect rate still rises by >= 0.3 from the most "
                          "familiar to the most unfamiliar bin", rise, ">=", 0.3)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--distribution", default="all", choices=["1", "2", "3", "all"])
    scales.add_checkpoint_arg(parser)
    scales.add_common_args(parser)
    args, run_args = scales.parse_run_args(EXPERIMENT, parser, argv)
    cfg = replace(PRESETS[run_args.preset_key], checkpoint=args.checkpoint)
    distributions = [1, 2, 3] if args.distribution == "all" else [int(args.distribution)]
    run = results.Run(run_args.out, EXPERIMENT, run_args.scale, run_args.preset, run_args.seed,
                      config=asdict(cfg) | {"distributions": distributions})

    with run.stage("load_base_model"):
        base = models.load_base(run_args.scale, run_args.preset, run_args.seed, cache_hits=run.cache_hits)
        splits = base.world.triviaqa_splits() if base.world is not None else data.load_triviaqa()
        pool, eval_questions = splits["finetune"], splits["eval"][: cfg.max_eval_questions]

    with run.stage("score_unfamiliarity"):
        def score(questions):
            return unfamiliarity.triviaqa_unfamiliarity(base.model, base.tokenizer, base.key, questions, pool,
                                                        cfg.scoring, seed=run_args.seed, cache_hits=run.cache_hits)
        incorrect_pool, incorrect_eval = score(pool), score(eval_questions)
        unfamiliar = unfamiliarity.triviaqa_is_unfamiliar(incorrect_pool, cfg.scoring.n_samples)
    run.extra["split"] = {"finetune": len(pool), "unfamiliar": int(unfamiliar.sum()), "eval": len(eval_questions),
                          "eval_incorrect_histogram": np.bincount(incorrect_eval.astype(int)).tolist()}

    lora = (models.with_format_tokens(cfg.lora, base.tokenizer, [tasks.IDK, tasks.ANSWER_PREFIX])
            if cfg.train_format_tokens else cfg.lora)
    # The finetuning data of each distribution; the uniform checkpoint rule holds a validation split out of the pool.
    train_idx, val_idx = sft.validation_split(len(pool), cfg.checkpoint, run_args.seed)
    finetuning, idk_of = {}, {}
    for distribution in distributions:
        rng = np.random.default_rng([run_args.seed, distribution])
        prompts, targets, idk_of[distribution] = build_distribution([pool[i] for i in train_idx],
                                                                    unfamiliar[train_idx], distribution, rng)
        validation = build_distribution([pool[i] for i in val_idx], unfamiliar[val_idx], distribution,
                                        rng)[:2] if len(val_idx) else None
        finetuning[f"dist{distribution}"] = ((prompts, targets), validation)
    step = (sft.select_uniform_step(base, lora, cfg.sft, finetuning, run, run_args.seed, run_args.resume)
            if cfg.checkpoint == "uniform" else cfg.sft.total_steps)
    run.extra["checkpoint_step"] = step

    bins = Bins(cfg.incorrect_bins, closed="left")
    claims = []
    for distribution in distributions:
        run.extra[f"dist{distribution}_idk_fraction"] = float(idk_of[distribution].mean())
        (prompts, targets), _ = finetuning[f"dist{distribution}"]
        model = sft.finetune_lora(base, lora, cfg.sft, prompts, targets, f"dist{distribution}", run,
                                  seed=run_args.seed, resume=run_args.resume, at_step=step)
        with run.stage(f"evaluate_dist{distribution}"):
            frame = evaluation.triviaqa_outcomes(model, base.tokenizer, eval_questions, incorrect_eval,
                                                 cfg.eval_sampling, seed=run_args.seed)
            base.model = model.unload()
        run.write_csv(f"triviaqa_sft{distribution}_generations.csv", frame)
        table = evaluation.triviaqa_table(frame, bins)
        run.write_csv(f"triviaqa_sft{distribution}.csv", table)
        if bins.inclusive() is not bins:
            run.write_csv(f"triviaqa_sft{distribution}_inclusive.csv",
                          evaluation.triviaqa_table(frame, bins.inclusive()))
        plotting.outcome_figure(table, bins.edges, f"TriviaQA Finetuning Distribution {distribution}",
                                run.path(f"triviaqa_sft{distribution}.png"))
        claims += distribution_claims(distribution, table)

    run.write_claims(claims)
    run.write_manifest()


if __name__ == "__main__":
    main()
