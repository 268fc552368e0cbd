"""Exp.5 — Long-form factuality with standard vs conservative reward models (Figs. 5-8, table; SPEC.md 1.3, 6).

Biographies and plot premises: score each evaluation entity's unfamiliarity (mean false facts over few-shot
base-model samples), SFT the base model on the task, and label its responses' facts (FActScore-style,
`common.factscore`). The reward models and the RL policies (SPEC.md 6.3-6.4) are the next stages of issue 15 and
not built yet: this run stops after the standard SFT model's evaluation.

    python exp05_longform_conservative_rm/run.py [--task bio|plot|both] [--scale ...] [--seed N]
                                                 [--wikipedia enwiki.db] [--wikibios wiki_bio] [--wikiplots DIR]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import data, factscore, models, results, sampling, scales, sft, tasks, unfamiliarity  # noqa: E402
from common.buckets import Bins, summarize_by_bin  # noqa: E402

EXPERIMENT = "exp05_longform_conservative_rm"
FACT_COLUMNS = ["n_true", "n_false", "frac_true"]


@dataclass(frozen=True)
class Exp5Config:
    sft: dict  # task -> SFTConfig (the paper's runs differ per task)
    lora: models.LoraSettings = field(default_factory=models.LoraSettings)
    scoring: unfamiliarity.LongformScoringSettings = field(default_factory=unfamiliarity.LongformScoringSettings)
    # SPEC.md 6.5: one greedy response per evaluation prompt, <= 200 new tokens
    eval_sampling: sampling.SamplingConfig = field(default_factory=lambda: sampling.SamplingConfig(
        max_new_tokens=200, temperature=0, batch_size=16))
    unfamiliarity_bins: tuple[float, ...] = (0, 1.5, 3, 4.5, 6, 7.5)  # lower edge inclusive (SPEC.md 6.6)
    train_format_tokens: bool = False
    # Prompts end with the response's prefix and the entity's name (tasks.longform_lead), which the response then
    # continues. Synthetic scale only: measured on seed 0 (mean true / false facts of 4, evaluation bios, most
    # exposed entities), the paper's prompts 1.5 / 1.0, since the SFT'd model writes the name in 0-25% of its
    # responses (plots: 0.0 true, the quoted title is another token); with the name in the prompt 3.6 / 0.0.
    named_prompts: bool = False
    max_eval_items: int | None = None


def paper_sft(steps: int) -> sft.SFTConfig:
    # SPEC.md 6.2: lr 1e-5, cosine T_max 1e4 to 1e-10, batch 24; "Standard SFT" is read at bios 20000, plots 15000
    return sft.SFTConfig(lr=1e-5, batch_size=24, total_steps=steps, t_max=10_000, eta_min=1e-10,
                         checkpoint_every=1000)


PRESETS = {
    "paper": Exp5Config(sft={"bio": paper_sft(20_000), "plot": paper_sft(15_000)}),
    "synthetic": Exp5Config(
        sft={"bio": sft.SYNTHETIC_SFT, "plot": sft.SYNTHETIC_SFT},
        # The base model writes a profile only at a document's start (pretraining never puts one after other
        # text), so unfamiliarity continues the stem "{name} is a". Measured on seed 0 (mean false facts of 4, eval
        # bios, exposure 0 / 10-20 / 80+): the SFT-format few-shot prompt 0.14 / 0.57 / 0.56 (the base writes
        # "Initech." or nothing), the stem 1.43 / 0.12 / 0.00.
        scoring=unfamiliarity.LongformScoringSettings(max_new_tokens=24, batch_size=64, stem="{topic} is a"),
        eval_sampling=sampling.SamplingConfig(max_new_tokens=24, temperature=0, batch_size=128),
        # four facts per profile sentence: mean false facts over 2 samples lies in 0, 0.5, ..., 4
        unfamiliarity_bins=(0, 1, 2, 3, 4.5), train_format_tokens=True, named_prompts=True),
    "micro": Exp5Config(
        sft={"bio": sft.MICRO_SFT, "plot": sft.MICRO_SFT}, lora=models.MICRO_LORA,
        scoring=unfamiliarity.LongformScoringSettings(n_shots=2, max_new_tokens=8, batch_size=16),  # the few-shot path
        eval_sampling=sampling.SamplingConfig(max_new_tokens=8, temperature=0, batch_size=16),
        unfamiliarity_bins=(0, 1, 2, 4.5), max_eval_items=8, named_prompts=True),
}


def load_items(base, task: str, args) -> dict[str, list[tasks.LongformItem]]:
    if base.world is not None:
        return base.world.longform_splits(task)
    wikipedia = factscore.LocalWikipedia(args.wikipedia)
    if task == "bio":
        return data.load_wikibios(wikipedia, source=args.wikibios)
    if args.wikiplots is None:
        raise scales.UsageError("--wikiplots is needed at paper scale: a folder with WikiPlots' titles and plots")
    return data.load_wikiplots(args.wikiplots, wikipedia)


def fact_checker(base, args):
    if base.world is not None:
        return factscore.WorldFactChecker(base.world.entities)
    return factscore.OpenAIFactChecker(factscore.LocalWikipedia(args.wikipedia))


def label_responses(checker, items, responses: list[str], unfamiliarity_scores: np.ndarray) -> pd.DataFrame:
    """One row per (whole) response: validity, true / false facts and the fraction true (invalid or undecided:
    0 facts, fraction 0, the notebook's definition)."""
    texts = [tasks.longform_text(it.task, r) for it, r in zip(items, responses)]
    labels = factscore.label_all(checker, [it.topic for it in items], texts)
    counts = [factscore.fact_counts(f) for f in labels]
    return pd.DataFrame({"topic": [it.topic for it in items], "unfamiliarity": unfamiliarity_scores,
                         "response": responses, "valid": [t is not None for t in texts],
                         "n_true": [c[0] for c in counts], "n_false": [c[1] for c in counts],
                         "frac_true": [factscore.fraction_true(f) for f in labels]})


def run_task(base, cfg: Exp5Config, task: str, run, run_args, args) -> dict:
    with run.stage(f"{task}_data"):
        splits = load_items(base, task, args)
        pool, eval_items = splits["finetune"], splits["eval"][: cfg.max_eval_items]
        checker = fact_checker(base, args)
    run.extra[f"{task}_split"] = {"finetune": len(pool), "eval": len(eval_items)}

    with run.stage(f"{task}_unfamiliarity"):
        scores = unfamiliarity.longform_unfamiliarity(base.model, base.tokenizer, base.key, eval_items, pool,
                                                      checker, cfg.scoring, seed=run_args.seed,
                                                      cache_hits=run.cache_hits)

    def lead(it):
        return tasks.longform_lead(it, cfg.named_prompts)

    def prompt(it):
        return tasks.longform_prompt(it) + lead(it)

    prompts = [prompt(it) for it in pool]
    targets = [tasks.longform_target(it)[len(lead(it)):] for it in pool]
    lora = (models.with_format_tokens(cfg.lora, base.tokenizer, [tasks.LONGFORM_PREFIXES[task]])
            if cfg.train_format_tokens else cfg.lora)
    policy = sft.finetune_lora(base, lora, cfg.sft[task], prompts, targets, f"{task}_sft", run,
                               seed=run_args.seed, resume=run_args.resume)
    with run.stage(f"{task}_evaluate_sft"):
        generations = sampling.generate(policy, base.tokenizer,
                                        [prompt(it) for it in eval_items],
                                        cfg.eval_sampling, desc=f"{task}: SFT responses")
        responses = [tasks.with_lead(lead(it), g[0]) for it, g in zip(eval_items, generations)]
        base.model = policy.unload()
        frame = label_responses(checker, eval_items, responses, scores)
    run.write_csv(f"{task}_sft_responses.csv", frame)
    table = summarize_by_bin(frame, "unfamiliarity", Bins(cfg.unfamiliarity_bins, closed="left"), FACT_COLUMNS)
    run.write_csv(f"{task}_sft_facts.csv", table)
    return {"sft_fraction_true": float(frame.frac_true.mean()), "sft_valid": float(frame.valid.mean())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="both", choices=["bio", "plot", "both"])
    parser.add_argument("--wikipedia", type=Path, default=None,
                        help="paper scale: FActScore's enwiki-20230401.db (references and fact checking)")
    parser.add_argument("--wikibios", default=data.WIKIBIO_SOURCE, help="paper scale: wiki_bio's Hub id or folder")
    parser.add_argument("--wikiplots", type=Path, default=None, help="paper scale: WikiPlots' folder")
    scales.add_common_args(parser)
    args, run_args = scales.parse_run_args(EXPERIMENT, parser, argv)
    if run_args.scale == "paper" and args.wikipedia is None:
        raise scales.UsageError("--wikipedia is needed at paper scale: the path of FActScore's enwiki-20230401.db")
    cfg = PRESETS[run_args.preset_key]
    task_names = ["bio", "plot"] if args.task == "both" else [args.task]
    run = results.Run(run_args.out, EXPERIMENT, run_args.scale, run_args.preset, run_args.seed,
                      config=asdict(cfg) | {"tasks": task_names})

    with run.stage("load_base_model"):
        base = models.load_base(run_args.scale, run_args.preset, run_args.seed, cache_hits=run.cache_hits)
    for task in task_names:
        run.extra[task] = run_task(base, cfg, task, run, run_args, args)
    run.write_manifest()


if __name__ == "__main__":
    main()
