"""Exp.6 — SimpleFact: GRPO that answers when it knows and says Unknown when it does not (SPEC.md section 7,
`shared/seeds/simplefact_notes.md`).

A cold start teaches the response format (a short reasoning span, then \\boxed{answer} or \\boxed{Unknown}) under
three prompts of different caution; GRPO then trains the balanced prompt's policy with the group-conditional reward
(correct 1 / process-correct 0.5 when some response of the group is correct, not-attempt 1 when none is) in the
four round-2 settings, on the questions whose sampled outcomes vary most. Evaluation: k samples per held-out
question, the 5-way decomposition, the eval reward, and the prompts' accuracy vs not-attempt trade-off.

    python exp06_simplefact_grpo/run.py [--setting fact|caution|both|fact-then-caution|all] [--filter/--no-filter]
                                        [--scale auto|synthetic|paper] [--seed N]
"""
from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (cache, data, models, plotting, results, sampling, scales, sft, simplefact, tasks,  # noqa: E402
                    training, unfamiliarity)
from common.rl import grpo  # noqa: E402

EXPERIMENT = "exp06_simplefact_grpo"
PROMPTS = ("cautious", "balanced", "bold")  # the notes' "different system prompts", most cautious first


@dataclass(frozen=True)
class Exp6Config:
    grpo: grpo.GRPOConfig
    cold_start: sft.SFTConfig | None  # synthetic scale: SFT into the format; paper scale: the prompt alone
    lora: models.LoraSettings = field(default_factory=models.LoraSettings)
    full_finetune: bool = False  # round 2's 7B run (fp32 weights + AdamW: more than one 80 GB GPU); LoRA otherwise
    # Synthetic scale: a prompt is a prefix the cold start conditions on. Its target says Unknown on this share of
    # the questions, those on which the base model's few-shot samples agree least, and answers the rest, so the
    # prompts trace the accuracy vs not-attempt trade-off. A share, not an agreement threshold, so that a prompt
    # means the same on every world: "at least 3 of 12 samples agree" put 9.9% of seed 0's balanced targets on
    # Unknown and 4.6% of seed 2's, and seed 0's cautious start left "All Attempt and Wrong" too little room to
    # fall (4.0%, against 7.9%); 2 of 12 leaves 0.1% and no abstention for GRPO to reward (exp06 README).
    unknown_share: dict = field(default_factory=lambda: {"cautious": 0.3, "balanced": 0.05, "bold": 0.0})
    candidates: int = 3  # answers the cold start's reasoning lists, most often sampled first
    base_samples: unfamiliarity.QAScoringSettings = field(default_factory=unfamiliarity.QAScoringSettings)
    train_prompt: str = "balanced"
    filter_samples: int = 16  # SPEC.md 7.5: samples per training question from the starting model
    filter_keep: int = 2500
    filter_score: str = "correctness"  # SPEC.md 7.5's p(1 - p); the synthetic preset uses "reward" (see simplefact)
    eval_questions: int = 60  # SPEC.md 7.6: 15 per source x 4 sources
    eval_samples: int = 20  # k, as the training group
    process_reading: str = "retrieved"
    sample_batch_size: int = 32
    mix_per_source: int = 4000  # paper scale (SPEC.md 7.1): training questions per source, capped by SimpleQA
    mix_eval_per_source: int = 15


PRESETS = {
    # Round 2 (SPEC.md 7.1, 7.4): Qwen2.5-7B-Instruct fully finetuned with ratio clipping and a clamped KL,
    # G = 20; round 1 (Qwen2.5-32B + LoRA) is `--model Qwen/Qwen2.5-32B-Instruct --no-full-finetune`.
    "paper": Exp6Config(grpo=grpo.GRPOConfig(lr=1e-6, eta_min=1e-6, t_max=10_000, total_steps=1200,
                                             prompts_per_step=16, group_size=20, minibatch_size=8, clip_eps=0.05,
                                             kl_coef=1.0, kl_clamp=10.0, max_new_tokens=512, checkpoint_every=100,
                                             eval_every=200, sample_batch_size=16, keep_checkpoints=2),
                        cold_start=None, full_finetune=True),
    # Synthetic (measured on seed 2, setting both; exp06 README): G = 16 keeps 0.975 of the filtered groups
    # informative (G = 8: 0.85); a constant lr let the policy drift back to answering as the 400 questions were
    # revisited (All Attempt and Wrong 7.9% -> 1.9% at step 10 -> 5.2% at step 60), the cosine decay over the
    # 240 optimizer steps (60 rollout steps x 4 minibatches) holds it (3.5% at step 60); 480 evaluation
    # questions, since with 120 one question moved the decomposition by 0.83 points against a 3-point claim.
    "synthetic": Exp6Config(
        grpo=grpo.GRPOConfig(lr=2e-3, eta_min=2e-4, t_max=240, total_steps=60, prompts_per_step=16,
                             group_size=16, minibatch_size=64, clip_eps=0.2, kl_coef=0.05, max_new_tokens=16,
                             checkpoint_every=20, eval_every=10, sample_batch_size=64),
        cold_start=sft.SYNTHETIC_SFT,
        base_samples=unfamiliarity.QAScoringSettings(max_new_tokens=6, batch_size=64),
        filter_keep=400, filter_score="reward", eval_questions=480, sample_batch_size=64),
    "micro": Exp6Config(
        grpo=grpo.GRPOConfig(lr=1e-3, eta_min=1e-3, total_steps=2, prompts_per_step=2, group_size=3,
                             minibatch_size=6, max_new_tokens=6, checkpoint_every=1, eval_every=1,
                             sample_batch_size=4),
        cold_start=sft.MICRO_SFT, lora=models.MICRO_LORA,
        base_samples=unfamiliarity.QAScoringSettings(n_samples=3, max_new_tokens=4, batch_size=32),
        filter_samples=4, filter_keep=6, eval_questions=4, eval_samples=3, sample_batch_size=8, mix_per_source=2,
        mix_eval_per_source=1),
}


# ---------------------------------------------------------------------------------------------------------------
# Prompts and the cold start

def prompt(question: tasks.QAQuestion, style: str, tokenizer=None) -> str:
    """Synthetic scale: the style word as a prefix, then the question (" Be balanced. Q: ...\\nA:"). Paper
    scale (a chat tokenizer): the notes' system prompt, made more or less cautious, in the chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return f"Be {style}. Q: {question.question}\nA:"
    system = simplefact.SYSTEM_PROMPT + {"cautious": " Say \\boxed{Unknown} unless you are certain.",
                                         "balanced": "", "bold": " Always give your best guess."}[style]
    return tokenizer.apply_chat_template([{"role": "system", "content": system},
                                          {"role": "user", "content": question.question}],
                                         tokenize=False, add_generation_prompt=True)


def cold_start_targets(samples: list[list[str]], styles: list[str], cfg: Exp6Config,
                       rng: np.random.Generator) -> list[str]:
    """Each question's target from the base model's own few-shot samples, no gold label: the most sampled answers
    as the reasoning, then the top one boxed, or Unknown if the question is among the `unknown_share[style]` of
    all questions whose top answer has the smallest share of the samples (ties in random order)."""
    answers = [Counter(a for a in (tasks.strip_eos(s.split("\n", 1)[0]).strip() for s in group) if a)
               for group in samples]
    agreement = [c.most_common(1)[0][1] / len(g) if c else 0.0 for c, g in zip(answers, samples)]
    rank = np.empty(len(samples))
    rank[np.lexsort((rng.random(len(samples)), agreement))] = np.arange(len(samples)) / len(samples)
    targets = []
    for counts, r, style in zip(answers, rank, styles):
        ranked = [a for a, _ in counts.most_common(cfg.candidates)] or [simplefact.UNKNOWN]
        answer = ranked[0] if counts and r >= cfg.unknown_share[style] else None
        targets.append(simplefact.synthetic_response(ranked, answer))
    return targets


def starting_policy(base, pool: list[tasks.QAQuestion], cfg: Exp6Config, run, run_args):
    """The cold-start model (the synthetic base model SFT'd into the format, merged), or at paper scale the
    instruction-tuned base itself, which the system prompt steers; and a key naming it."""
    if cfg.cold_start is None or base.world is None:
        return base.model, base.key
    with run.stage("cold_start_samples"):
        ids = [q.question_id for q in pool]
        joined = unfamiliarity.cached_scores(
            "simplefact-base-samples", base.key, ids, {"settings": cfg.base_samples, "seed": run_args.seed},
            lambda: ["\x1f".join(g) for g in unfamiliarity.fewshot_samples(
                base.model, base.tokenizer, pool, pool, cfg.base_samples, run_args.seed)],
            run.cache_hits, dtype=str)
    samples = [s.split("\x1f") for s in joined]
    rng = np.random.default_rng([run_args.seed, 60])
    styles = [PROMPTS[i] for i in rng.integers(len(PROMPTS), size=len(pool))]
    prompts = [prompt(q, s) for q, s in zip(pool, styles)]
    targets = cold_start_targets(samples, styles, cfg, rng)
    unknown = [simplefact.last_boxed(t) == simplefact.UNKNOWN for t in targets]
    run.extra["cold_start_unknown_share"] = {s: float(np.mean([u for u, x in zip(unknown, styles) if x == s]))
                                             for s in PROMPTS}
    # The response format's pieces never occur in pretraining (the build forbids \\boxed), so their embeddings and
    # output rows are untrained: the base model puts NLL 19-29 on " \\", "boxed", "{" and "}". LoRA on q/v alone
    # cannot write them (cold-start loss 13.2 -> 2.5 after 3,000 steps, every sampled response malformed).
    lora = models.with_format_tokens(cfg.lora, base.tokenizer,
                                     [simplefact.synthetic_response([simplefact.UNKNOWN], None)])
    model = sft.finetune_lora(base, lora, cfg.cold_start, prompts, targets, "cold_start", run,
                              seed=run_args.seed, resume=run_args.resume)
    return models.merge_lora(model), model.adapter_key


# ---------------------------------------------------------------------------------------------------------------
# Sampling, classes and evaluation

def sample_classes(model, tokenizer, questions: list[tasks.QAQuestion], style: str, k: int, cfg: Exp6Config,
                   seed: int, model_key: str | None = None, cache_hits: dict | None = None) -> list[list[str]]:
    """k responses per question under prompt `style`, as response classes. With `model_key` (a model that
    training does not change) the responses are cached, so a rerun or another setting does not sample again."""
    scfg = sampling.SamplingConfig(max_new_tokens=cfg.grpo.max_new_tokens, temperature=cfg.grpo.temperature,
                                   num_samples=k, batch_size=max(1, cfg.sample_batch_size // k * 4))
    prompts = [prompt(q, style, tokenizer) for q in questions]

    def draw() -> list[list[str]]:
        return sampling.generate(model, tokenizer, prompts, scfg, desc=f"sample ({style})", generator_seed=seed)

    if model_key is None:
        responses = draw()
    else:
        joined = unfamiliarity.cached_scores(f"simplefact-{style}-k{k}", model_key, prompts, {"sampling": scfg,
                                             "seed": seed}, lambda: ["\x1f".join(g) for g in draw()], cache_hits,
                                             dtype=str)
        responses = [g.split("\x1f") for g in joined]
    return [[simplefact.classify(r, q, cfg.process_reading) for r in group] for group, q in zip(responses, questions)]


def evaluation_row(per_question: list[list[str]]) -> dict[str, float]:
    """The decomposition (percent), the eval reward (mean over questions of the mean group reward, setting both),
    the accuracy and the not-attempt rate over all responses."""
    flat = [c for g in per_question for c in g]
    return {**simplefact.decomposition(per_question),
            "eval_reward": float(np.mean([np.mean(simplefact.group_reward(g)) for g in per_question])),
            "accuracy": float(np.mean([c == simplefact.CORRECT for c in flat])),
            "not_attempt": float(np.mean([c == simplefact.NOT_ATTEMPT for c in flat]))}


def informative(per_question: list[list[str]]) -> float:
    """Share of questions whose group of responses gets a non-constant reward (setting both)."""
    return float(np.mean([len(set(simplefact.group_reward(g))) > 1 for g in per_question]))


def grpo_policy(start, cfg: Exp6Config, seed: int):
    """The policy GRPO trains and its frozen reference: a fresh LoRA adapter on the starting model (reference:
    the adapter disabled), or with `full_finetune` a trainable copy of the starting model (reference: the start)."""
    if not cfg.full_finetune:
        return models.add_lora(start, cfg.lora, seed=seed), None
    policy = copy.deepcopy(start).float()  # AdamW's 1e-6 steps vanish under bf16 rounding: fp32 master weights
    for p in policy.parameters():
        p.requires_grad_(True)
    for p in start.parameters():
        p.requires_grad_(False)
    return policy, start.eval()


def release(policy, start, cfg: Exp6Config):
    """The untouched starting model, for the next setting."""
    return start if cfg.full_finetune else policy.unload()


NOTES_COLUMNS = ("Partial Correct", "Partial NotAttempt", "All NotAttempt", "All Correct", "All Attempt and Wrong")


def tradeoff_points(folder: Path, train_prompt: str) -> pd.DataFrame:
    """The prompts' points and each trained setting's final evaluation, from the run folder."""
    points = [pd.read_csv(folder / "prompt_tradeoff.csv")]
    for setting in simplefact.SETTINGS:
        path = folder / f"decomposition_{setting}.csv"
        if path.exists():
            points.append(pd.read_csv(path).tail(1).drop(columns="step").assign(policy=f"RL ({setting})",
                                                                                prompt=train_prompt))
    return pd.concat(points, ignore_index=True)


def decomposition_markdown(tables: dict[str, pd.DataFrame]) -> str:
    """One table per setting in the notes' layout: evaluation step, then the five columns in percent."""
    out = []
    for setting, t in tables.items():
        out += [f"### Setting: {setting}", "", "| Training Steps | " + " | ".join(NOTES_COLUMNS) + " |",
                "|---|" + "---|" * len(NOTES_COLUMNS)]
        out += [f"| {int(r.step)} | " + " | ".join(f"{r[c]:.2f}" for c in NOTES_COLUMNS) + " |" for _, r in t.iterrows()]
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# Claims

def compute_claims(folder: Path) -> list[results.Claim]:
    """From whatever the run folder holds (a run of one setting keeps the others' results)."""
    final = {}
    for setting in simplefact.SETTINGS:
        path = folder / f"decomposition_{setting}.csv"
        if path.exists():
            final[setting] = pd.read_csv(path)
    claims = []
    if "both" in final:
        t = final["both"]
        first, last = t.iloc[0], t.iloc[-1]
        claims += [
            results.claim("simplefact.eval_reward_rises", "setting both: eval reward at the last evaluation minus "
                          "at step 0", last.eval_reward - first.eval_reward, ">=", 0.05),
            results.claim("simplefact.all_wrong_falls", "setting both: the All Attempt and Wrong share (percent "
                          "points) falls from step 0 to the end", first["All Attempt and Wrong"]
                          - last["All Attempt and Wrong"], ">=", 3.0),
            results.claim("simplefact.partial_correct_drops", "setting both, the notes' undesired round-1 effect: "
                          "Partial Correct falls while All NotAttempt rises (value: the smaller of the two changes, "
                          "percent points; may pass or fail)", min(first["Partial Correct"] - last["Partial Correct"],
                                                                   last["All NotAttempt"] - first["All NotAttempt"]),
                          ">=", 0.0)]
    filtering = folder / "filtering.csv"
    if filtering.exists():
        f = pd.read_csv(filtering).set_index("questions").informative
        claims.append(results.claim(
            "simplefact.filter_informative", "after filtering, the share of training questions whose group reward "
            "varies is >= 0.9 and >= 0.2 above the unfiltered pool (value: the smaller margin)",
            min(f["kept"] - 0.9, f["kept"] - f["all"] - 0.2), ">=", 0.0))
    if "fact" in final and "caution" in final:
        fact, caution = final["fact"].iloc[-1], final["caution"].iloc[-1]
        claims.append(results.claim(
            "simplefact.caution_vs_fact", "at the end, All NotAttempt is higher under caution-only than fact-only, "
            "and All Correct + Partial Correct higher under fact-only (value: the smaller margin, percent points)",
            min(caution["All NotAttempt"] - fact["All NotAttempt"],
                fact["All Correct"] + fact["Partial Correct"] - caution["All Correct"] - caution["Partial Correct"]),
            ">", 0.0))
    tradeoff = folder / "tradeoff.csv"
    if tradeoff.exists() and "both" in final:
        t = pd.read_csv(tradeoff)
        prompts = t[t.policy == "cold start"].sort_values("not_attempt")
        rl = t[t.policy == "RL (both)"].iloc[0]
        frontier = float(np.interp(rl.not_attempt, prompts.not_attempt, prompts.accuracy))
        claims.append(results.claim(
            "simplefact.frontier", "the setting-both policy's accuracy minus the prompts' trade-off curve (linear "
            "interpolation between the prompts' points, flat beyond the outermost prompts) at its own not-attempt rate", rl.accuracy - frontier,
            ">", 0.0))
    return claims


# ---------------------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="all", choices=[*simplefact.SETTINGS, "all"])
    parser.add_argument("--filter", action=argparse.BooleanOptionalAction, default=True,
                        help="train on the questions whose sampled outcomes vary most (SPEC.md 7.5; default on)")
    parser.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct", help="paper scale: the Hub id or a folder")
    parser.add_argument("--full-finetune", action=argparse.BooleanOptionalAction, default=None,
                        help="train every weight (round 2) instead of a LoRA adapter (round 1); default: the preset's")
    parser.add_argument("--shard", action="store_true",
                        help="under several processes, shard the GRPO policy with FSDP2 instead of replicating it "
                             "(round 1's 32B model; one --setting per run)")
    parser.add_argument("--data", type=Path, default=None,
                        help="paper scale: a folder with one subfolder of <split>.jsonl files per source "
                             f"({', '.join(data.SIMPLEFACT_SOURCES)}) instead of the Hub")
    scales.add_common_args(parser)
    args, run_args = scales.parse_run_args(EXPERIMENT, parser, argv)
    cfg = PRESETS[run_args.preset_key]
    if args.full_finetune is not None:
        cfg = replace(cfg, full_finetune=args.full_finetune)
    settings = list(simplefact.SETTINGS) if args.setting == "all" else [args.setting]
    if args.shard:
        if len(settings) > 1:  # a sharded model cannot give back the untouched start the next setting needs
            raise SystemExit("error: --shard trains one setting per run; pass --setting fact|caution|both|...")
        cfg = replace(cfg, grpo=replace(cfg.grpo, shard=True))
    run = results.Run(run_args.out, EXPERIMENT, run_args.scale, run_args.preset, run_args.seed,
                      config=asdict(cfg) | {"settings": settings, "filter": args.filter})

    with run.stage("load_base_model"):
        base = models.load_base(run_args.scale, run_args.preset, run_args.seed, model_id=args.model,
                                cache_hits=run.cache_hits)
        if base.world is not None:
            splits = base.world.triviaqa_splits()
        else:
            sources = {name: str(args.data / name) for name in data.SIMPLEFACT_SOURCES} if args.data else None
            splits = data.load_simplefact_mix(sources, cfg.mix_per_source, cfg.mix_eval_per_source, run_args.seed)
        held_out = np.random.default_rng([run_args.seed, 62]).permutation(len(splits["eval"]))[: cfg.eval_questions]
        pool, eval_questions = splits["finetune"], [splits["eval"][i] for i in held_out]
    start, start_key = starting_policy(base, pool, cfg, run, run_args)
    tok = base.tokenizer

    eval_seed = run_args.seed + 2  # the prompts' points and every RL evaluation: step 0 equals the balanced point
    with run.stage("prompt_tradeoff"):
        points = [{"policy": "cold start", "prompt": style,
                   **evaluation_row(sample_classes(start, tok, eval_questions, style, cfg.eval_samples, cfg,
                                                   eval_seed, start_key, run.cache_hits))} for style in PROMPTS]
    run.write_csv("prompt_tradeoff.csv", pd.DataFrame(points))

    with run.stage("filter_training_questions"):
        # Selection and measurement use independent samples: questions chosen for varied outcomes on one draw
        # vary by construction on that draw, so whether their groups stay informative is measured on a fresh
        # draw of the group GRPO will see.
        kept = list(range(len(pool)))
        if args.filter:
            selection = sample_classes(start, tok, pool, cfg.train_prompt, cfg.filter_samples, cfg,
                                       run_args.seed + 1, start_key, run.cache_hits)
            kept = simplefact.most_varied(selection, cfg.filter_keep, cfg.filter_score)
            fresh = sample_classes(start, tok, pool, cfg.train_prompt, cfg.grpo.group_size, cfg, run_args.seed + 3,
                                   start_key, run.cache_hits)
            run.write_csv("filtering.csv", pd.DataFrame([
                {"questions": "all", "n": len(pool), "informative": informative(fresh)},
                {"questions": "kept", "n": len(kept), "informative": informative([fresh[i] for i in kept])}]))
        else:  # an earlier filtered run's numbers would describe other training questions
            run.path("filtering.csv").unlink(missing_ok=True)
    train_questions = [pool[i] for i in kept]
    train_prompts = [prompt(q, cfg.train_prompt, tok) for q in train_questions]

    for setting in settings:
        def reward(step: int, i: int, responses: list[str], setting=setting) -> list[float]:
            classes = [simplefact.classify(r, train_questions[i], cfg.process_reading) for r in responses]
            return simplefact.group_reward(classes, simplefact.setting_at(setting, step, cfg.grpo.total_steps))

        def evaluate(step: int) -> dict[str, float]:
            return evaluation_row(sample_classes(policy, tok, eval_questions, cfg.train_prompt, cfg.eval_samples,
                                                 cfg, eval_seed))

        policy, reference = grpo_policy(start, cfg, run_args.seed)
        out_dir = cache.cache_dir("grpo", start_key, setting, cfg.grpo, cfg.lora, cfg.full_finetune, run_args.seed,
                                  train_prompts, train_questions, cfg.process_reading, cfg.eval_samples,
                                  cfg.sample_batch_size, eval_seed, eval_questions)
        run.cache_hits[f"grpo_{setting}"] = training.is_finished(out_dir, cfg.grpo)
        with run.stage(f"grpo_{setting}"):
            curves = grpo.train_grpo(policy, tok, train_prompts, reward, cfg.grpo, out_dir, run_args.seed,
                                     resume=run_args.resume, evaluate=evaluate, reference=reference,
                                     desc=f"GRPO {setting}")
        run.write_csv(f"curves_{setting}.csv", curves)
        table = curves.dropna(subset=["eval_reward"])[["step", *simplefact.DECOMPOSITION, "eval_reward", "accuracy",
                                                       "not_attempt"]]
        run.write_csv(f"decomposition_{setting}.csv", table)
        start = release(policy, start, cfg)

    # A run of one setting keeps the others' results in the folder; the figures and claims use all of them.
    tables = {s: pd.read_csv(run.path(f"decomposition_{s}.csv")) for s in simplefact.SETTINGS
              if run.path(f"decomposition_{s}.csv").exists()}
    curves = {s: pd.read_csv(run.path(f"curves_{s}.csv")) for s in tables}
    tradeoff = tradeoff_points(run.out_dir, cfg.train_prompt)
    run.write_csv("tradeoff.csv", tradeoff)
    results.atomic_write(run.path("decomposition.md"), lambda p: p.write_text(decomposition_markdown(tables)))
    plotting.simplefact_figures(curves, tradeoff, run.out_dir)
    run.write_claims(compute_claims(run.out_dir))
    run.write_manifest()


if __name__ == "__main__":
    main()
