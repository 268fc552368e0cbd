"""Exp.5 — Long-form factuality with standard vs conservative reward models (Figs. 5-8, table; SPEC.md 1.3, 6).

Biographies and plot premises: score each evaluation entity's unfamiliarity (mean false facts over few-shot
base-model samples), SFT the base model on the task, and label its responses' facts (FActScore-style,
`common.factscore`). Two two-stage reward models (`common.longform_rm`) share a decomposer trained on the SFT model's
samples; their per-fact classifiers differ in data: the conservative one learns from facts of the SFT model's own
samples, the standard one from facts of a writer whose errors do not depend on the entity. Fig. 5 compares their
predicted rewards with the ground truth on the SFT model's evaluation responses. PPO from the SFT model with each
reward model then gives the policies of Fig. 7 (true and false facts by unfamiliarity), the table (mean fraction of
true facts) and Fig. 8 (greedy responses for three entities of rising unfamiliarity). Not built: the standard reward
model's GPT-3.5 writer at paper scale, so a paper-scale run stops before training.

    python exp05_longform_conservative_rm/run.py [--task bio|plot|both] [--scale ...] [--seed N]
                                                 [--wikipedia enwiki.db] [--wikibios wiki_bio] [--wikiplots DIR]
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (data, factscore, longform_rm, models, plotting, results, reward_model, sampling,  # noqa: E402
                    scales, sft, tasks, unfamiliarity)
from common.buckets import Bins, summarize_by_bin  # noqa: E402
from common.rl import ppo  # noqa: E402

EXPERIMENT = "exp05_longform_conservative_rm"
log = logging.getLogger(EXPERIMENT)
FACT_COLUMNS = ["n_true", "n_false", "frac_true"]
METHODS = [m for m, _, _ in plotting.LONGFORM_METHODS]  # sft, rl_standard, rl_conservative
RM_KINDS = ("standard", "conservative")


@dataclass(frozen=True)
class Exp5Config:
    sft: dict  # task -> SFTConfig (the paper's runs differ per task)
    lora: models.LoraSettings = field(default_factory=models.LoraSettings)
    scoring: unfamiliarity.LongformScoringSettings = field(default_factory=unfamiliarity.LongformScoringSettings)
    # SPEC.md 6.5: one greedy response per evaluation prompt, <= 200 new tokens
    eval_sampling: sampling.SamplingConfig = field(default_factory=lambda: sampling.SamplingConfig(
        max_new_tokens=200, temperature=0, batch_size=16))
    unfamiliarity_bins: tuple[float, ...] = (0, 1.5, 3, 4.5, 6, 7.5)  # lower edge inclusive (SPEC.md 6.6)
    # The per-fact classifiers (SPEC.md 6.3): lr 2e-5, cosine T_max 1e4 to 1e-10, batch 30, read at step 10000
    rm_sft: sft.SFTConfig = field(default_factory=lambda: sft.SFTConfig(
        lr=2e-5, batch_size=30, total_steps=10_000, t_max=10_000, eta_min=1e-10, checkpoint_every=1000))
    # the conservative reward model's data: one T=1 sample of the SFT model per training prompt (SPEC.md 6.3)
    rm_sampling: sampling.SamplingConfig = field(default_factory=lambda: sampling.SamplingConfig(
        max_new_tokens=200, temperature=1.0, batch_size=16))
    writer_error_rate: float = 0.2  # synthetic scale: the standard reward model's writer, wrong on 20% of facts
    # Share of the finetuning entities held out of SFT whose prompts give the reward models' data (the paper: 0, the
    # same prompts; its SFT sees each of 104,539 bios at most once before the RL start). Synthetic scale: 3,000 SFT
    # steps of 16 over ~380 bios memorise every target, so the SFT model's samples on its own training prompts are
    # right about unfamiliar entities too (seed 0: 93% of the plot samples' facts true; in the most unfamiliar
    # bin the conservative RM then predicted +5.8 where the truth was -12.0).
    rm_prompt_fraction: float = 0.0
    rm_batch_size: int = 16
    # the shared decomposer (SPEC.md 6.3): lr 2e-5, cosine T_max 1e4 to 1e-10, batch 32; read at bios 1000, plots 3000
    decomposer_sft: dict = field(default_factory=lambda: {
        task: sft.SFTConfig(lr=2e-5, batch_size=32, total_steps=steps, t_max=10_000, eta_min=1e-10,
                            checkpoint_every=1000) for task, steps in (("bio", 1000), ("plot", 3000))})
    decompose: sampling.SamplingConfig = field(default_factory=lambda: sampling.SamplingConfig(
        max_new_tokens=200, temperature=0, batch_size=16))
    # "learned" (SPEC.md 6.3) or "labeller": the labeller's own atoms. Synthetic scale: the world model does not
    # learn to copy an entity's name into its atoms. Measured on seed 0's plot evaluation responses, base + LoRA q/v
    # SFT'd on the SFT samples' atoms reproduced them exactly for 1.7% of the responses after 1,000 steps and 5%
    # after 3,000 (with the writer's texts added); read with the prompt's entity in place of the atom's subject,
    # 57%: a third of the responses lost facts or gained invented ones.
    decomposer: str = "learned"
    # SPEC.md 6.4: beta 0.5, cliprange 0.005, batch 10, 42 x 4 = 168 rollouts per round, lr 1e-5 constant, 120 new
    # tokens. The authors read different steps per method (bios 32000 / 10000, plots 30000 / 15000); one step for
    # both methods here (SPEC.md section 8's fixed rule).
    ppo: ppo.PPOConfig = field(default_factory=lambda: ppo.PPOConfig(
        total_steps=30_000, num_rollouts=168, chunk_size=42, batch_size=10, init_kl_coef=0.5, cliprange=0.005,
        max_new_tokens=120, checkpoint_every=1000, eval_every=1000))
    curve_eval_items: int = 64  # evaluation entities behind the PPO training curves
    train_format_tokens: bool = False
    # Prompts end with the response's prefix and the entity's name (tasks.longform_lead), which the response then
    # continues. Synthetic scale only: measured on seed 0 (mean true / false facts of 4, evaluation bios, most
    # exposed entities), the paper's prompts 1.5 / 1.0, since the SFT'd model writes the name in 0-25% of its
    # responses (plots: 0.0 true, the quoted title is another token); with the name in the prompt 3.6 / 0.0.
    named_prompts: bool = False
    # Synthetic scale: the world's entities also have a country, most of them the first (`world.COUNTRY`), the
    # vaguer fact a careful writer states about an entity it does not know. Measured on the country-free world
    # (seed 1, bios, fraction of true facts in the two most unfamiliar bins): SFT 0.15 / 0.00, RL + standard RM
    # 0.19 / 0.03, RL + conservative RM 0.10 / 0.03, as it drops false facts there but has no true one to write.
    country_majority: float = 0.0
    # Synthetic scale: the share of references cut after a random earlier clause (`World.longform_splits`), so the
    # SFT model can write a less detailed response and RL can find one. Measured on seed 0 with every reference
    # whole (bios, RL + conservative RM, most unfamiliar bin): the policy dropped false facts (SFT 0.88 / 4.12 true
    # / false, RL 0.41 / 1.65) by leaving the grammar ("Drisenka is Vandelay."), the country fact with them.
    shortened_references: float = 0.0
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
        # text), so unfamiliarity continues the profile's opening, "{name} is from". Measured on seed 0's
        # country-free world (mean false facts of 4, eval bios, exposure 0 / 10-20 / 80+): the SFT-format few-shot
        # prompt 0.14 / 0.57 / 0.56 (the base writes "Initech." or nothing), the stem "{name} is a" 1.43 / 0.12 /
        # 0.00.
        scoring=unfamiliarity.LongformScoringSettings(max_new_tokens=24, batch_size=64, stem="{topic} is from"),
        eval_sampling=sampling.SamplingConfig(max_new_tokens=24, temperature=0, batch_size=128),
        # five facts per profile sentence: mean false facts over 2 samples lies in 0, 0.5, ..., 5
        unfamiliarity_bins=(0, 1, 2, 3, 5.5), train_format_tokens=True, named_prompts=True, country_majority=0.8,
        shortened_references=0.3,
        rm_sft=sft.SYNTHETIC_SFT, rm_batch_size=256, rm_prompt_fraction=0.5,
        # 16 samples per prompt (the paper: 1; the writer writes as many): 77-190 held-out entities per task. With 4,
        # seed 0's conservative RM learnt from 407 plot facts and judged the familiar end far below the truth
        # (predicted -2.8 against 5.0 in the most familiar bin), and PPO with it dropped true facts there.
        rm_sampling=sampling.SamplingConfig(max_new_tokens=24, temperature=1.0, num_samples=16, batch_size=128),
        decomposer="labeller",
        # exp03's synthetic PPO; the KL coefficient by measurement (9-epoch world before the country and the SFT fix,
        # not re-tuned since; seed 0, bios, RL + conservative RM, true / false
        # facts per response in the most familiar and the most unfamiliar bin, SFT 3.53 / 0.47 and 0.89 / 2.67):
        # beta 0.1 collapses every response to a fact-free string (0.99 / 0.11, 0.22 / 0.33), beta 0.5 keeps the
        # SFT model's (3.62 / 0.38, 0.78 / 3.22), beta 0.2 drops mostly the false facts (3.17 / 0.38, 0.56 / 1.11).
        # 240 steps, not exp03's 480 (the learning rate is constant, so the first 240 steps are the same run): on
        # seed 0 the curves' fraction of true facts (64 evaluation entities) had levelled off by step 80-240 (bios:
        # SFT 0.708, RL + conservative RM 0.799 / 0.812 / 0.792 at steps 80 / 240 / 480, RL + standard RM 0.716 /
        # 0.684 / 0.721; plots 0.607, 0.782 / 0.804 / 0.845, 0.707 / 0.667 / 0.828), and each run took 175 s of 480.
        ppo=ppo.PPOConfig(lr=3e-3, eta_min=3e-3, cliprange=0.2, total_steps=240, num_rollouts=512, chunk_size=256,
                          batch_size=128, ppo_epochs=4, vf_only_steps=16, init_kl_coef=0.2, max_new_tokens=24,
                          checkpoint_every=120, eval_every=80)),
    "micro": Exp5Config(
        sft={"bio": sft.MICRO_SFT, "plot": sft.MICRO_SFT}, lora=models.MICRO_LORA,
        scoring=unfamiliarity.LongformScoringSettings(n_shots=2, max_new_tokens=8, batch_size=16),  # the few-shot path
        eval_sampling=sampling.SamplingConfig(max_new_tokens=8, temperature=0, batch_size=16),
        unfamiliarity_bins=(0, 1, 2, 5.5), max_eval_items=8, named_prompts=True, country_majority=0.8,
        shortened_references=0.3,
        rm_sft=sft.MICRO_SFT,
        rm_prompt_fraction=0.5,
        rm_sampling=sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, batch_size=16),
        decomposer_sft={"bio": sft.MICRO_SFT, "plot": sft.MICRO_SFT},
        decompose=sampling.SamplingConfig(max_new_tokens=16, temperature=0, batch_size=16),
        ppo=ppo.PPOConfig(lr=1e-3, eta_min=1e-3, total_steps=4, num_rollouts=4, chunk_size=4, batch_size=2,
                          ppo_epochs=1, vf_only_steps=2, init_kl_coef=0.1, max_new_tokens=8, checkpoint_every=2,
                          eval_every=2),
        curve_eval_items=4),
}


def load_items(base, cfg: Exp5Config, task: str, args) -> dict[str, list[tasks.LongformItem]]:
    if base.world is not None:
        return base.world.longform_splits(task, cfg.shortened_references)
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


def label_responses(checker, items, responses: list[str], unfamiliarity_scores: np.ndarray
                    ) -> tuple[pd.DataFrame, list]:
    """One row per (whole) response: validity, true / false facts, the fraction true (invalid or undecided:
    0 facts, fraction 0, the notebook's definition) and the reward they earn (SPEC.md 6.3); and the facts."""
    texts = [tasks.longform_text(it.task, r) for it, r in zip(items, responses)]
    labels = factscore.label_all(checker, [it.topic for it in items], texts)
    counts = [factscore.fact_counts(f) for f in labels]
    frame = pd.DataFrame({"topic": [it.topic for it in items], "unfamiliarity": unfamiliarity_scores,
                          "response": responses, "valid": [t is not None for t in texts],
                          "n_true": [c[0] for c in counts], "n_false": [c[1] for c in counts],
                          "frac_true": [factscore.fraction_true(f) for f in labels]})
    frame["true_reward"] = [longform_rm.response_reward(t, f, v)
                            for t, f, v in zip(frame.n_true, frame.n_false, frame.valid)]
    return frame, labels


def standard_writer_texts(base, items: list[tasks.LongformItem], cfg: Exp5Config, seed: int) -> list[str]:
    """The standard reward model's writer, one text per item: every entity's facts wrong at the same rate
    (synthetic scale; `main` stops a paper-scale run before it starts)."""
    from common import world

    entities = {e.name: e for e in base.world.entities}
    rng = np.random.default_rng([seed, 70])
    return [world.noisy_profile(entities[it.topic], cfg.writer_error_rate, rng) for it in items]


def train_decomposer(base, cfg: Exp5Config, task: str, sampled: list, sampled_labels: list, frame: pd.DataFrame,
                       eval_facts: list, run, run_args):
    """The decomposer SFT'd on the SFT model's samples and their labelled atoms; with its agreement with the
    labeller on the evaluation responses ({task}_decompositions.csv). Returns (its cache key, the decomposer)."""
    inputs, targets = longform_rm.decomposition_pairs(sampled, sampled_labels)
    lora = (models.with_format_tokens(cfg.lora, base.tokenizer, [longform_rm.decomposition_target(["."] * 8)])
            if cfg.train_format_tokens else cfg.lora)
    model = sft.finetune_lora(base, lora, cfg.decomposer_sft[task], inputs, targets, f"{task}_decomposer", run,
                              seed=run_args.seed, resume=run_args.resume)
    decomposer = longform_rm.learned_decomposer(models.merged_copy(model), base.tokenizer, cfg.decompose)
    base.model = model.unload()
    texts = [tasks.longform_text(task, r) for r in frame.response]
    with run.stage(f"{task}_decomposer_agreement"):
        decomposed = decomposer(frame.topic.tolist(), texts)
    valid = [i for i, t in enumerate(texts) if t is not None]
    exact = [decomposed[i] == eval_facts[i] for i in valid]
    run.write_csv(f"{task}_decompositions.csv", pd.DataFrame({
        "topic": frame.topic.iloc[valid], "response": [texts[i] for i in valid],
        "labelled": [" | ".join(eval_facts[i]) for i in valid],
        "decomposed": [" | ".join(decomposed[i]) for i in valid], "exact": exact}))
    run.extra[f"{task}_decomposer_exact"] = float(np.mean(exact)) if valid else None
    return model.adapter_key, decomposer


def fig5_claims(task: str, table: pd.DataFrame) -> list[results.Claim]:
    last = table[table["count"] > 0].iloc[-1]
    standard, conservative, truth = last.standard_reward_mean, last.conservative_reward_mean, last.true_reward_mean
    return [
        results.claim(f"fig5.{task}.standard_overestimates", "in the most unfamiliar bin the standard RM's mean "
                      "predicted reward exceeds the ground truth by >= 2.0 (value: the excess)", standard - truth,
                      ">=", 2.0),
        results.claim(f"fig5.{task}.conservative_below_standard", "in the most unfamiliar bin the conservative RM's "
                      "prediction is <= the standard RM's - 2.0 and <= the ground truth + 1.0 (value: the smaller "
                      "margin)", min(standard - 2.0 - conservative, truth + 1.0 - conservative), ">=", 0.0)]


def table_claim(task: str, fractions: dict[str, float]) -> results.Claim:
    rl, sft_, standard = fractions["rl_conservative"], fractions["sft"], fractions["rl_standard"]
    return results.claim(f"table.{task}.order", "fraction of true facts: RL + conservative RM - SFT >= 0.10 and RL + "
                         "conservative RM - RL + standard RM >= 0.05 (value: the smaller margin)",
                         min(rl - sft_ - 0.10, rl - standard - 0.05), ">=", 0.0)


def fig7_claim(task: str, facts: pd.DataFrame) -> results.Claim:
    """Fig. 7 on one task's `facts_by_method` table: RL + conservative RM writes fewer false facts per response than
    SFT in every occupied bin, and its true facts, averaged over those bins, are at least 0.8x SFT's."""
    by = {m: t[t["count"] > 0].set_index("bin") for m, t in facts.groupby("method")}
    value = float("nan")  # no conservative policy was trained (a reward model without data)
    if "rl_conservative" in by:
        sft_, rl = by["sft"], by["rl_conservative"].reindex(by["sft"].index)
        value = min((sft_.n_false_mean - rl.n_false_mean).min(), rl.n_true_mean.mean() / sft_.n_true_mean.mean() - 0.8)
    return results.claim(f"fig7.{task}.fewer_false", "RL + conservative RM has fewer false facts per response than SFT "
                         "in every occupied bin and at least 0.8x its true facts averaged over the bins (value: the "
                         "smaller margin, false facts fewer in the closest bin or the true-fact ratio - 0.8)",
                         value, ">", 0.0)


@dataclass
class TaskResult:
    frames: dict  # method -> one row per evaluation response (label_responses); None: not trained
    labels: dict  # method -> each response's labelled facts
    extra: dict
    claims: list


def run_task(base, cfg: Exp5Config, task: str, run, run_args, args) -> TaskResult:
    with run.stage(f"{task}_data"):
        splits = load_items(base, cfg, task, args)
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

    def respond(model, items, sampling_cfg, desc, seed=None):
        """Each item's responses (`sampling_cfg.num_samples`), the lead put back."""
        generations = sampling.generate(model, base.tokenizer, [prompt(it) for it in items], sampling_cfg,
                                        desc=f"{task}: {desc}", generator_seed=seed)
        return [[tasks.with_lead(lead(it), x) for x in g] for it, g in zip(items, generations)]

    def evaluate(model, items=eval_items, item_scores=scores):
        """Greedy responses to the evaluation prompts, labelled (SPEC.md 6.5)."""
        responses = [r[0] for r in respond(model, items, cfg.eval_sampling, "evaluation responses")]
        return label_responses(checker, items, responses, item_scores)

    held_out = np.random.default_rng([run_args.seed, 71]).random(len(pool)) < cfg.rm_prompt_fraction
    sft_items = [it for it, h in zip(pool, held_out) if not h]
    rm_items = [it for it, h in zip(pool, held_out) if h] or pool  # the reward models' prompts
    run.extra[f"{task}_split"] |= {"sft": len(sft_items), "reward_model_prompts": len(rm_items)}
    prompts = [prompt(it) for it in sft_items]
    targets = [tasks.longform_response(it, cfg.named_prompts) for it in sft_items]
    lora = (models.with_format_tokens(cfg.lora, base.tokenizer, [tasks.LONGFORM_PREFIXES[task]])
            if cfg.train_format_tokens else cfg.lora)
    policy = sft.finetune_lora(base, lora, cfg.sft[task], prompts, targets, f"{task}_sft", run,
                               seed=run_args.seed, resume=run_args.resume)
    init_key = policy.adapter_key
    frames, labels = {}, {}
    with run.stage(f"{task}_evaluate_sft"):
        frames["sft"], labels["sft"] = evaluate(policy)
    with run.stage(f"{task}_sample_sft"):  # the conservative reward model's and the decomposer's data
        samples = respond(policy, rm_items, cfg.rm_sampling, "SFT samples", seed=run_args.seed)
        start = models.merged_copy(policy)  # the RL starting point (SPEC.md 6.4)
        base.model = policy.unload()

    # the writer writes as many texts per prompt as the SFT model samples
    per_sample = [it for it in rm_items for _ in range(cfg.rm_sampling.num_samples)]
    topics = [it.topic for it in per_sample]
    sampled = [tasks.longform_text(task, r) for rs in samples for r in rs]
    sampled_labels = factscore.label_all(checker, topics, sampled)
    writer_texts = standard_writer_texts(base, per_sample, cfg, run_args.seed)
    examples = {"conservative": longform_rm.fact_examples(topics, sampled_labels),
                "standard": longform_rm.fact_examples(topics, factscore.label_all(checker, topics, writer_texts))}
    run.extra[f"{task}_rm_sample_valid"] = float(np.mean([t is not None for t in sampled]))

    # The decomposer, shared by both reward models: the SFT model's samples -> their labelled atoms (SPEC.md 6.3).
    frame = frames["sft"]
    eval_facts = [None if not v else [f.text for f in facts or []] for v, facts in zip(frame.valid, labels["sft"])]
    if cfg.decomposer == "learned":
        decomposer_key, decomposer = train_decomposer(base, cfg, task, sampled, sampled_labels, frame, eval_facts,
                                                        run, run_args)
    else:
        decomposer_key, decomposer = ("labeller", checker.key), longform_rm.labeller_decomposer(checker)

    # Fig. 5: each classifier judges the labeller's facts of the SFT model's evaluation responses (the decomposer
    # bypassed, as in the paper); then PPO from the SFT model with the whole two-stage reward model.
    classifier = longform_rm.FactClassifier(task, checker if base.world is not None else None)
    for kind in RM_KINDS:
        facts = examples[kind]
        run.extra[f"{task}_rm_{kind}_facts"] = {
            "n": len(facts), "true_share": float(np.mean([f.supported for f in facts])) if facts else None}
        fact_prompts, rewards, recalled = classifier.training_data(facts)
        if not fact_prompts:  # the micro world's SFT model writes no clause of the grammar
            log.warning("%s: no fact for the %s reward model to learn from; it predicts NaN and trains no "
                        "policy", task, kind)
            frame[f"{kind}_reward"] = np.nan
            frames[f"rl_{kind}"] = labels[f"rl_{kind}"] = None
            continue
        model = reward_model.train(base, cfg.lora, cfg.rm_sft, fact_prompts, rewards, f"{task}_rm_{kind}", run,
                                   seed=run_args.seed, resume=run_args.resume, recalled=recalled,
                                   words=classifier.verdicts)
        classifier_key = model.adapter_key
        with run.stage(f"{task}_rm_{kind}_predict"):
            frame[f"{kind}_reward"] = longform_rm.predicted_rewards(classifier, model, base.tokenizer,
                                                                    frame.topic.tolist(), eval_facts,
                                                                    cfg.rm_batch_size)
            rm = longform_rm.TwoStageRewardModel(decomposer, models.merged_copy(model), classifier, base.tokenizer,
                                                 cfg.rm_batch_size)
            base.model = model.unload()

        def score(idx, generations, rm=rm):
            items = [sft_items[i] for i in idx]
            return rm.rewards([it.topic for it in items], [tasks.longform_text(task, tasks.with_lead(lead(it), g))
                                                          for it, g in zip(items, generations)])

        def curve_point(step):
            point, _ = evaluate(rl, eval_items[: cfg.curve_eval_items], scores[: cfg.curve_eval_items])
            return {"eval_frac_true": point.frac_true.mean(), "eval_true": point.n_true.mean(),
                    "eval_false": point.n_false.mean(), "eval_valid": point.valid.mean()}

        rl = models.add_lora(start, cfg.lora, seed=run_args.seed)
        reward_key = (decomposer_key, classifier_key, classifier.reward_format, checker.key)
        ppo.train_cached(rl, base.tokenizer, [prompt(it) for it in sft_items], score, cfg.ppo, f"{task}_rl_{kind}",
                         run, run_args.seed, init_key, (*reward_key, cfg.eval_sampling, cfg.curve_eval_items),
                         resume=run_args.resume, evaluate=curve_point)
        with run.stage(f"{task}_evaluate_rl_{kind}"):
            frames[f"rl_{kind}"], labels[f"rl_{kind}"] = evaluate(rl)
        start = rl.unload()
    run.write_csv(f"{task}_rm_predictions.csv", frame)
    bins = Bins(cfg.unfamiliarity_bins, closed="left")
    table = summarize_by_bin(frame, "unfamiliarity", bins, ["true_reward", "conservative_reward", "standard_reward"])
    run.write_csv(f"{task}_rewards.csv", table)
    plotting.predicted_reward_lines(table, task, run.path(f"{task}_rewards.png"))
    trained = [m for m in METHODS if frames[m] is not None]
    for method in trained:
        run.write_csv(f"{task}_{method}_responses.csv", frames[method])
    fractions = {m: float(frames[m].frac_true.mean()) if m in trained else float("nan") for m in METHODS}
    extra = {"fraction_true": fractions, "valid": {m: float(frames[m].valid.mean()) for m in trained}}
    return TaskResult(frames, labels, extra, fig5_claims(task, table) + [table_claim(task, fractions)])


def facts_by_method(frames: dict, bins: Bins) -> pd.DataFrame:
    """Fig. 7's data: true / false facts (and the fraction true) by unfamiliarity bin, one block per method."""
    return pd.concat([summarize_by_bin(frames[m], "unfamiliarity", bins, FACT_COLUMNS).assign(method=m)
                      for m in METHODS if frames[m] is not None], ignore_index=True)


def fig8_cells(result: TaskResult, n_entities: int = 3) -> tuple[pd.DataFrame, list[dict]]:
    """Fig. 8: the evaluation entities nearest to the lowest, middle and highest unfamiliarity, with the greedy
    responses of SFT and RL + conservative RM, each word marked when it belongs only to false facts."""
    sft_frame = result.frames["sft"]
    score = sft_frame.unfamiliarity.to_numpy()
    wanted = np.linspace(score.min(), score.max(), n_entities)
    rows, cells, chosen = [], [], []
    for target in wanted:
        i = int(np.argmin(np.where(np.isin(np.arange(len(score)), chosen), np.inf, np.abs(score - target))))
        chosen.append(i)
        for method, row in (("sft", "Standard SFT"), ("rl_conservative", "RL+Conservative RM")):
            if result.frames[method] is None:
                continue
            frame, facts = result.frames[method], result.labels[method][i]
            topic, response = frame.topic.iloc[i], tasks.strip_eos(frame.response.iloc[i])
            title = f"{topic} (unfamiliarity {score[i]:.1f})"
            rows.append({"topic": topic, "unfamiliarity": score[i], "method": method, "response": response,
                         "false_facts": " | ".join(f.text for f in facts or [] if not f.supported)})
            cells.append({"title": title, "row": row, "words": factscore.mark_unsupported(response, facts, topic)})
    return pd.DataFrame(rows), cells


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
    if run_args.scale == "paper":  # stop before any training, not after the SFT model's GPU hours
        raise scales.UsageError("the standard reward model's writer at paper scale (GPT-3.5 through the OpenAI "
                                "client, SPEC.md 6.3) is not built yet; run --scale synthetic")
    cfg = PRESETS[run_args.preset_key]
    task_names = ["bio", "plot"] if args.task == "both" else [args.task]
    run = results.Run(run_args.out, EXPERIMENT, run_args.scale, run_args.preset, run_args.seed,
                      config=asdict(cfg) | {"tasks": task_names})

    with run.stage("load_base_model"):
        base = models.load_base(run_args.scale, run_args.preset, run_args.seed, cache_hits=run.cache_hits,
                                country_majority=cfg.country_majority)
    task_results = {task: run_task(base, cfg, task, run, run_args, args) for task in task_names}
    bins = Bins(cfg.unfamiliarity_bins, closed="left")
    fig7 = {task: facts_by_method(r.frames, bins) for task, r in task_results.items()}
    for task, table in fig7.items():
        run.write_csv(f"{task}_facts.csv", table)
    plotting.fact_count_grid(fig7, run.path("fig7_facts.png"))
    fractions = pd.DataFrame({task: r.extra["fraction_true"] for task, r in task_results.items()}).T[METHODS]
    run.write_csv("table_fraction_true.csv", fractions.rename_axis("task").reset_index())
    fig8_task = "plot" if "plot" in task_results else task_names[0]  # the paper's Fig. 8 shows plots
    fig8_rows, cells = fig8_cells(task_results[fig8_task])
    run.write_csv("fig8_responses.csv", fig8_rows)
    plotting.response_grid(cells, ["Standard SFT", "RL+Conservative RM"], run.path("fig8_responses.png"))
    for task, r in task_results.items():
        run.extra[task] = r.extra
    run.write_claims([c for task, r in task_results.items() for c in r.claims + [fig7_claim(task, fig7[task])]])
    run.write_manifest()


if __name__ == "__main__":
    main()
