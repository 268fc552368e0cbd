"""Exp.4 — Reward models on MMLU and TriviaQA (Fig. 4; SPEC.md section 5).

A reward model (base + LoRA, SFT'd to write "True"/"False" after a question and a candidate answer) learns from
familiar questions with right (reward 1) and wrong (reward 0) answers, and from unfamiliar questions labelled all
reward 1 (distribution 1) or all reward 0 (distribution 2). The claim: on familiar held-out questions it tells
right from wrong answers, and as questions grow unfamiliar its prediction drifts to the unfamiliar examples'
label whatever the answer: over-estimated rewards for distribution 1, under-estimated for distribution 2.

    python exp04_reward_models/run.py [--task mmlu|triviaqa|both] [--distribution 1|2|all] [--scale ...] [--seed N]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import data, models, plotting, results, reward_model, scales, sft, tasks, unfamiliarity  # noqa: E402
from common.buckets import Bins, occupied, summarize_by_bin  # noqa: E402

EXPERIMENT = "exp04_reward_models"
UNFAMILIAR_REWARD = {1: 1, 2: 0}  # the label every unfamiliar finetuning example carries, per distribution
REWARD_COLUMNS = ["p_right", "p_wrong"]  # P(reward 1) for each held-out question's right and wrong answer


@dataclass(frozen=True)
class Exp4Config:
    mmlu_sft: sft.SFTConfig
    triviaqa_sft: sft.SFTConfig
    lora: models.LoraSettings = field(default_factory=models.LoraSettings)
    # "direct": the paper's True/False after the candidate; "recall": recall-then-judge, the synthetic scale's
    # deviation (`common.reward_model`; README "The synthetic world")
    reward_format: str = "direct"
    mmlu_scoring: str = "letter"  # how the base model's unfamiliarity is read (SPEC.md 1.1)
    mmlu_answer: str = "letter"  # the candidate answer in the prompt, one of tasks.MC_ANSWER_FORMATS
    mmlu_options: bool = True  # the MMLU prompt shows the options (the paper's); False: the question alone
    triviaqa_scoring: unfamiliarity.QAScoringSettings = field(default_factory=unfamiliarity.QAScoringSettings)
    normalize_answers: bool = True  # TriviaQA candidates through the SQuAD normaliser, as the authors' code did
    wrong_answer_rounds: int = 4  # rounds of few-shot samples searched for each question's incorrect answer
    nll_bins: tuple[float, ...] = (0, 0.02, 0.5, 1, 1.5, 2)  # lower edge inclusive here (SPEC.md section 5)
    incorrect_bins: tuple[int, ...] = (1, 3, 5, 7, 9, 11, 13)  # as Exp.2: the paper's #correct bins
    # False: the paper's description (each question one example; familiar labels half 1, half 0; as many
    # unfamiliar examples as familiar ones). True: the authors' code (every familiar question gives a reward-1 and
    # a reward-0 example, so familiar:unfamiliar is 2:1).
    authors_composition: bool = False
    balance_groups: bool = True  # off only for the micro preset, whose untrained world knows nothing
    eval_batch_size: int = 32
    max_eval_questions: int | None = None
    checkpoint: str = "authors"  # the checkpoint rule, one of sft.CHECKPOINT_RULES (--checkpoint)

    def __post_init__(self):
        if not self.mmlu_options and self.mmlu_answer == "letter":
            raise ValueError("an MMLU reward-model prompt without its options needs candidates written as text, "
                             "not letters (mmlu_answer 'text' or 'text_letter')")


PRESETS = {
    # SPEC.md section 5: MMLU batch 12, lr 1e-5 constant, checkpoint 10000; TriviaQA batch 30, lr 1e-5 (cosine with
    # eta_min = lr, so constant), checkpoint 8000.
    "paper": Exp4Config(
        mmlu_sft=sft.SFTConfig(lr=1e-5, batch_size=12, total_steps=10_000, t_max=10_000, eta_min=1e-5,
                               checkpoint_every=1000),
        triviaqa_sft=sft.SFTConfig(lr=1e-5, batch_size=30, total_steps=8000, t_max=10_000, eta_min=1e-5,
                                   checkpoint_every=1000)),
    # The synthetic tokenizer knows only the written forms of answers (no lowercase city names), and its model
    # never answers an item by letter from memory (exp01 README), so candidates are written as the option's text. The
    # authors' composition, measured on the capable world, seed 0 (README): with the paper's, a distribution-1 reward
    # model copies the candidate and approves it on familiar TriviaQA questions too (P(reward 1 | wrong) 0.43 in the
    # most familiar bin; 0.18 with every familiar question shown with both labels). The MMLU prompt leaves the
    # options out: with them, the recall picks one of the four, so on an unfamiliar question it names the candidate
    # at chance (0.24 in seed 1's most unfamiliar bin), and the distribution-2 verdict after it stayed soft on seed 1
    # (familiar right / wrong 0.646 / 0.268; its claims -0.054 and 0.378) while seed 0's right answers in the most
    # unfamiliar bin sat at 0.28-0.30 of the claim's 0.3. Without them (seeds 1 / 0): 0.857 / 0.024, claims 0.157 /
    # 0.181 and 0.833 / 0.873; distribution 1 0.131 / 0.078 and 0.915 / 0.919 (with them 0.152 / 0.082, 0.833 / 0.887).
    "synthetic": Exp4Config(
        mmlu_sft=sft.SYNTHETIC_SFT, triviaqa_sft=sft.SYNTHETIC_SFT, reward_format="recall", mmlu_scoring="cloze",
        mmlu_answer="text", mmlu_options=False, authors_composition=True,
        triviaqa_scoring=unfamiliarity.QAScoringSettings(max_new_tokens=6, batch_size=64), normalize_answers=False,
        nll_bins=(0, 0.05, 0.357, 1.0, 1.4, 2.0), incorrect_bins=(0, 2, 4, 6, 8, 10, 13), eval_batch_size=256),
    "micro": Exp4Config(
        mmlu_sft=sft.MICRO_SFT, triviaqa_sft=sft.MICRO_SFT, lora=models.MICRO_LORA, reward_format="recall",
        mmlu_scoring="cloze", mmlu_answer="text", mmlu_options=False,
        triviaqa_scoring=unfamiliarity.QAScoringSettings(n_samples=3, max_new_tokens=4, batch_size=32),
        normalize_answers=False, wrong_answer_rounds=2, nll_bins=(0, 0.5, 1.0, 5.0), incorrect_bins=(0, 2, 4),
        balance_groups=False, max_eval_questions=12),
}


# ---------------------------------------------------------------------------------------------------------------
# Finetuning data (SPEC.md section 5)

def composition(familiar_idx: np.ndarray, unfamiliar_idx: np.ndarray, distribution: int, authors: bool,
                rng: np.random.Generator) -> pd.DataFrame:
    """The finetuning examples as rows (question, reward, familiar), before any prompt is written. The caller has
    already balanced the two groups. Familiar examples are half reward 1, half reward 0: each question once at a
    random label, or (`authors`) twice with both; unfamiliar ones all carry the distribution's label."""
    if authors:
        fam_q, fam_r = np.repeat(familiar_idx, 2), np.tile([1, 0], len(familiar_idx))
    else:
        fam_q, fam_r = familiar_idx, rng.permutation(np.arange(len(familiar_idx)) % 2)
    rows = pd.DataFrame({"question": np.concatenate([fam_q, unfamiliar_idx]),
                         "reward": np.concatenate([fam_r, np.full(len(unfamiliar_idx), UNFAMILIAR_REWARD[distribution])]),
                         "familiar": np.arange(len(fam_q) + len(unfamiliar_idx)) < len(fam_q)})
    return rows.astype({"question": int, "reward": int})


def mmlu_candidate(choices: tuple[str, ...], correct: int, reward: int, answer: str, rng: np.random.Generator) -> str:
    """The correct option (reward 1) or a uniformly random wrong one (reward 0), written in format `answer`."""
    position = correct if reward else int(rng.choice([j for j in range(len(choices)) if j != correct]))
    return tasks.mmlu_sft_answer(choices, position, answer)


def mmlu_examples(questions: list[tasks.MCQuestion], familiar: np.ndarray, distribution: int, cfg: Exp4Config,
                  rng: np.random.Generator) -> tuple[list[str], pd.DataFrame]:
    """Unfamiliar questions resampled with replacement to the familiar count; each example's option order drawn
    afresh."""
    fam_idx, unf_idx = np.flatnonzero(familiar), np.flatnonzero(~familiar)
    if cfg.balance_groups:
        if len(fam_idx) == 0 or len(unf_idx) == 0:
            raise SystemExit("error: the MMLU finetuning pool needs familiar and unfamiliar questions")
        unf_idx = rng.choice(unf_idx, size=len(fam_idx), replace=True)
    rows = composition(fam_idx, unf_idx, distribution, cfg.authors_composition, rng)
    prompts = []
    for i, reward in zip(rows.question, rows.reward):
        correct = int(rng.integers(len(tasks.LETTERS)))
        choices = tasks.place_correct(questions[i], correct, rng)
        prompts.append(tasks.mmlu_rm_prompt(questions[i].question, choices,
                                            mmlu_candidate(choices, correct, reward, cfg.mmlu_answer, rng),
                                            cfg.mmlu_options))
    rows["recalled"] = [questions[i].correct_text for i in rows.question]  # what a recall-then-judge RM writes
    return prompts, rows


def triviaqa_examples(questions: list[tasks.QAQuestion], unfamiliar: np.ndarray, wrong: np.ndarray,
                      distribution: int, cfg: Exp4Config, rng: np.random.Generator) -> tuple[list[str], pd.DataFrame]:
    """Both groups subsampled without replacement to the smaller one; questions for which the base model never
    gave an incorrect answer are left out (they could not give a reward-0 example)."""
    usable = wrong != ""
    fam_idx, unf_idx = np.flatnonzero(~unfamiliar & usable), np.flatnonzero(unfamiliar & usable)
    if cfg.balance_groups:
        n = min(len(fam_idx), len(unf_idx))
        if n == 0:
            raise SystemExit("error: the TriviaQA finetuning pool needs familiar and unfamiliar questions with an "
                             "incorrect base-model answer")
        fam_idx, unf_idx = rng.choice(fam_idx, n, replace=False), rng.choice(unf_idx, n, replace=False)
    rows = composition(fam_idx, unf_idx, distribution, cfg.authors_composition, rng)
    prompts = [tasks.triviaqa_rm_prompt(questions[i].question, questions[i].value if reward else wrong[i],
                                        cfg.normalize_answers) for i, reward in zip(rows.question, rows.reward)]
    rows["recalled"] = [questions[i].value for i in rows.question]
    return prompts, rows


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: every held-out question with its right and a wrong answer

def evaluate(model, tokenizer, ids: list[str], right: list[str], wrong: list[str | None], scores: np.ndarray,
             bins: Bins, batch_size: int, reward_format: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per question P(reward 1) for the right answer and for the wrong one (NaN where there is none), and the
    per-bin table the figure plots."""
    has_wrong = [w is not None for w in wrong]
    p = reward_model.predict(model, tokenizer, right + [w for w in wrong if w is not None], batch_size,
                             reward_format)
    frame = pd.DataFrame({"question": ids, "score": scores, "p_right": p[: len(right)], "p_wrong": np.nan})
    frame.loc[has_wrong, "p_wrong"] = p[len(right):]
    return frame, summarize_by_bin(frame, "score", bins, REWARD_COLUMNS)


def run_mmlu(base, cfg: Exp4Config, distributions: list[int], run, run_args) -> None:
    with run.stage("mmlu_score_unfamiliarity"):
        splits = base.world.mmlu_splits() if base.world is not None else data.load_mmlu()
        pool, eval_questions = splits["finetune"], splits["eval"][: cfg.max_eval_questions]
        fewshot = data.fewshot_by_subject(splits["fewshot"])

        def score(questions):
            return unfamiliarity.mmlu_unfamiliarity(base.model, base.tokenizer, base.key, questions, fewshot,
                                                    scoring=cfg.mmlu_scoring, cache_hits=run.cache_hits)
        nll_pool, nll_eval = score(pool), score(eval_questions)
        familiar = unfamiliarity.mmlu_is_familiar(nll_pool)
    run.extra["mmlu_split"] = {"finetune": len(pool), "familiar": int(familiar.sum()), "eval": len(eval_questions)}

    # Held-out questions in their original option order, with the right answer and a random wrong one.
    rng = np.random.default_rng([run_args.seed, 40])
    right = [tasks.mmlu_rm_prompt(q.question, q.choices, tasks.mmlu_sft_answer(q.choices, q.answer, cfg.mmlu_answer),
                                  cfg.mmlu_options) for q in eval_questions]
    wrong = [tasks.mmlu_rm_prompt(q.question, q.choices, mmlu_candidate(q.choices, q.answer, 0, cfg.mmlu_answer, rng),
                                  cfg.mmlu_options) for q in eval_questions]
    train_idx, val_idx = sft.validation_split(len(pool), cfg.checkpoint, run_args.seed)
    examples, validation = {}, {}
    for distribution in distributions:
        rng = np.random.default_rng([run_args.seed, 41, distribution])
        examples[distribution] = mmlu_examples([pool[i] for i in train_idx], familiar[train_idx], distribution, cfg,
                                               rng)
        if len(val_idx):
            validation[distribution] = mmlu_examples([pool[i] for i in val_idx], familiar[val_idx], distribution,
                                                     cfg, rng)
    step = checkpoint_step("mmlu", examples, validation, cfg.mmlu_sft, base, cfg, run, run_args)
    for distribution in distributions:
        train_and_evaluate("mmlu", distribution, *examples[distribution], cfg.mmlu_sft,
                           [q.question for q in eval_questions], right, wrong, nll_eval,
                           Bins(cfg.nll_bins, closed="left"), base, cfg, run, run_args, step)


def run_triviaqa(base, cfg: Exp4Config, distributions: list[int], run, run_args) -> None:
    with run.stage("triviaqa_score_unfamiliarity"):
        splits = base.world.triviaqa_splits() if base.world is not None else data.load_triviaqa()
        pool, eval_questions = splits["finetune"], splits["eval"][: cfg.max_eval_questions]

        def score(questions):
            return unfamiliarity.triviaqa_unfamiliarity(base.model, base.tokenizer, base.key, questions, pool,
                                                        cfg.triviaqa_scoring, seed=run_args.seed,
                                                        cache_hits=run.cache_hits)
        incorrect_pool, incorrect_eval = score(pool), score(eval_questions)
        unfamiliar = unfamiliarity.triviaqa_is_unfamiliar(incorrect_pool, cfg.triviaqa_scoring.n_samples)

    with run.stage("triviaqa_sample_wrong_answers"):
        def wrong_answers(questions):
            return unfamiliarity.triviaqa_incorrect_answers(base.model, base.tokenizer, base.key, questions, pool,
                                                            cfg.triviaqa_scoring, seed=run_args.seed,
                                                            max_rounds=cfg.wrong_answer_rounds,
                                                            cache_hits=run.cache_hits)
        wrong_pool, wrong_eval = wrong_answers(pool), wrong_answers(eval_questions)
    run.extra["triviaqa_split"] = {
        "finetune": len(pool), "unfamiliar": int(unfamiliar.sum()), "eval": len(eval_questions),
        "finetune_without_wrong_answer": int((wrong_pool == "").sum()),
        "eval_without_wrong_answer": int((wrong_eval == "").sum())}

    right = [tasks.triviaqa_rm_prompt(q.question, q.value, cfg.normalize_answers) for q in eval_questions]
    wrong = [tasks.triviaqa_rm_prompt(q.question, w, cfg.normalize_answers) if w else None
             for q, w in zip(eval_questions, wrong_eval)]
    train_idx, val_idx = sft.validation_split(len(pool), cfg.checkpoint, run_args.seed)
    examples, validation = {}, {}
    for distribution in distributions:
        rng = np.random.default_rng([run_args.seed, 42, distribution])
        examples[distribution] = triviaqa_examples([pool[i] for i in train_idx], unfamiliar[train_idx],
                                                   wrong_pool[train_idx], distribution, cfg, rng)
        if len(val_idx):
            validation[distribution] = triviaqa_examples([pool[i] for i in val_idx], unfamiliar[val_idx],
                                                         wrong_pool[val_idx], distribution, cfg, rng)
    step = checkpoint_step("triviaqa", examples, validation, cfg.triviaqa_sft, base, cfg, run, run_args)
    for distribution in distributions:
        train_and_evaluate("triviaqa", distribution, *examples[distribution], cfg.triviaqa_sft,
                           [q.question_id for q in eval_questions], right, wrong, incorrect_eval,
                           Bins(cfg.incorrect_bins, closed="left"), base, cfg, run, run_args, step)


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint rule (SPEC.md section 8): the preset's step, or one step for both distributions' reward models

def recalled_answers(rows: pd.DataFrame, cfg: Exp4Config) -> list[str] | None:
    return rows.recalled.tolist() if cfg.reward_format == "recall" else None


def checkpoint_step(task: str, examples: dict, validation: dict, sft_cfg: sft.SFTConfig, base, cfg: Exp4Config, run,
                    run_args) -> int:
    """The step both distributions' reward models are read at; recorded in the manifest."""
    if not validation:
        run.extra[f"{task}_checkpoint_step"] = sft_cfg.total_steps
        return sft_cfg.total_steps

    def pairs(prompts, rows):
        return prompts, reward_model.targets(rows.reward.tolist(), recalled_answers(rows, cfg))
    methods = {f"{task}_rm{d}": (pairs(*examples[d]), pairs(*validation[d])) for d in examples}
    step = sft.select_uniform_step(base, cfg.lora, sft_cfg, methods, run, run_args.seed, run_args.resume,
                                   table=f"{task}_checkpoint_selection.csv")
    run.extra[f"{task}_checkpoint_step"] = step
    return step


def train_and_evaluate(task: str, distribution: int, prompts: list[str], rows: pd.DataFrame, sft_cfg: sft.SFTConfig,
                       ids: list[str], right: list[str], wrong: list[str | None], scores: np.ndarray, bins: Bins, base,
                       cfg: Exp4Config, run, run_args, step: int) -> None:
    name = f"{task}_rm{distribution}"
    run.extra[f"{name}_examples"] = {group: rows[rows.familiar == (group == "familiar")].reward.value_counts()
                                     .sort_index().to_dict() for group in ("familiar", "unfamiliar")}
    model = reward_model.train(base, cfg.lora, sft_cfg, prompts, rows.reward.tolist(), name, run,
                               seed=run_args.seed, resume=run_args.resume, recalled=recalled_answers(rows, cfg),
                               at_step=step)
    with run.stage(f"evaluate_{name}"):
        frame, table = evaluate(model, base.tokenizer, ids, right, wrong, scores, bins, cfg.eval_batch_size,
                                cfg.reward_format)
        base.model = model.unload()
    run.write_csv(f"{name}_predictions.csv", frame)
    run.write_csv(f"{name}.csv", table)
    if bins.inclusive() is not bins:
        run.write_csv(f"{name}_inclusive.csv", summarize_by_bin(frame, "score", bins.inclusive(), REWARD_COLUMNS))
    title = f"{'MMLU' if task == 'mmlu' else 'TriviaQA'} Finetuning Distribution {distribution}"
    if task == "mmlu":
        plotting.reward_lines(table, title, run.path(f"{name}.png"))
    else:
        plotting.reward_lines(table, title, run.path(f"{name}.png"), at_bin_index=True,
                              xlabel=plotting.UNFAMILIARITY_LABEL + " (incorrect samples of 12)")


# ---------------------------------------------------------------------------------------------------------------
# Claims, from whatever the run folder holds (a run of one task keeps the other task's results)

def compute_claims(folder: Path) -> list[results.Claim]:
    claims = []
    for task in ("mmlu", "triviaqa"):
        for distribution in (1, 2):
            path = folder / f"{task}_rm{distribution}.csv"
            if not path.exists():
                continue
            t = occupied(pd.read_csv(path))
            first, last = t.iloc[0], t.iloc[-1]
            d = f"fig4.{task}.dist{distribution}"
            if distribution == 1:
                claims.append(results.claim(
                    f"{d}.overestimate", "dist.1: P(reward 1) on wrong answers <= 0.3 in the most familiar bin and "
                    ">= 0.7 in the most unfamiliar (value: the smaller margin)",
                    min(0.3 - first.p_wrong_mean, last.p_wrong_mean - 0.7), ">=", 0.0))
            else:
                claims.append(results.claim(
                    f"{d}.underestimate", "dist.2: P(reward 1) on right answers >= 0.7 in the most familiar bin and "
                    "<= 0.3 in the most unfamiliar (value: the smaller margin)",
                    min(first.p_right_mean - 0.7, 0.3 - last.p_right_mean), ">=", 0.0))
            claims.append(results.claim(
                f"{d}.familiar_separates", f"dist.{distribution}: in the most familiar bin mean P(reward 1) on right "
                "answers minus on wrong answers >= 0.5", first.p_right_mean - first.p_wrong_mean, ">=", 0.5))
    return claims


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="both", choices=["mmlu", "triviaqa", "both"])
    parser.add_argument("--distribution", default="all", choices=["1", "2", "all"])
    parser.add_argument("--composition", choices=["paper", "authors"], default=None,
                        help="paper: each familiar question once at a random label; authors: every familiar question "
                             "gives a reward-1 and a reward-0 example (familiar:unfamiliar 2:1), as the authors' code "
                             "did (SPEC.md section 9 item 8). Default: the preset's (paper at paper scale, authors "
                             "at synthetic scale)")
    scales.add_checkpoint_arg(parser)
    scales.add_common_args(parser)
    args, run_args = scales.parse_run_args(EXPERIMENT, parser, argv)
    cfg = replace(PRESETS[run_args.preset_key], checkpoint=args.checkpoint)
    if args.composition is not None:
        cfg = replace(cfg, authors_composition=args.composition == "authors")
    distributions = [1, 2] if args.distribution == "all" else [int(args.distribution)]
    task_names = ["mmlu", "triviaqa"] if args.task == "both" else [args.task]
    run = results.Run(run_args.out, EXPERIMENT, run_args.scale, run_args.preset, run_args.seed,
                      config=asdict(cfg) | {"distributions": distributions, "tasks": task_names})

    with run.stage("load_base_model"):
        base = models.load_base(run_args.scale, run_args.preset, run_args.seed, cache_hits=run.cache_hits)
    for task in task_names:
        (run_mmlu if task == "mmlu" else run_triviaqa)(base, cfg, distributions, run, run_args)
    run.write_claims(compute_claims(run.out_dir))
    run.write_manifest()


if __name__ == "__main__":
    main()
