"""What the synthetic world's base model knows and can do, measured on the model, never read from exposure counts.

    python -m common.world --scale synthetic [--seed N]

Per exposure bin, on the held-out facts (never written as a multiple-choice item in pretraining, so a skill
measured on them has generalised): greedy and T=1 5-shot Q/A accuracy, cloze multiple-choice accuracy (the
synthetic scale's MMLU scoring), 5-shot letter accuracy (MMLU's format: knowledge and letter binding in one step),
direct verification (5-shot, the verdict right after the candidate) and a small recall-then-judge reward model
trained on familiar facts of the finetuning pool. Once per world: the in-context skills on fresh items. The
gates the experiments rely on are written as claims (`world.*`).
"""
from __future__ import annotations

import argparse
import logging
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from common import models, plotting, results, reward_model, sampling, scales, sft, tasks, unfamiliarity
from common import world as W

log = logging.getLogger(__name__)
EXPOSURE_BINS = ((0, 0), (1, 2), (3, 5), (6, 10), (11, 20), (21, 40), (41, 80), (81, 10**9))
MC_SCORING = "cloze"  # the synthetic scale's MMLU scoring: a bare letter is knowledge and binding in one step
TABLE_COLUMNS = ("exposure_bin", "n_entities", "qa_accuracy", "qa_t1_accuracy", "mc_accuracy", "letter_accuracy",
                 "item_recall_accuracy", "verify_separation", "rm_probe_separation")


@dataclass(frozen=True)
class ProbeConfig:
    n_shots: int = 5
    t1_samples: int = 4
    max_new_tokens: int = 4
    in_context_items: int = 200
    rm_sft: sft.SFTConfig = field(default_factory=lambda: sft.SFTConfig(
        lr=2e-3, batch_size=16, total_steps=1500, t_max=1500, eta_min=2e-4, checkpoint_every=1500))
    rm_lora: models.LoraSettings = field(default_factory=models.LoraSettings)
    batch_size: int = 128


PROBES = {"synthetic": ProbeConfig(),
          "micro": ProbeConfig(in_context_items=8, rm_sft=sft.MICRO_SFT, rm_lora=models.MICRO_LORA, batch_size=32)}


def exposure_bin_label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else (f"{lo}+" if hi >= 10**9 else f"{lo}-{hi}")


def wrong_value(world: W.World, entity: W.Entity, attribute: W.Attribute) -> str:
    """A fixed wrong value for a fact (seeded per fact): the candidate a verifier must reject."""
    rng = np.random.default_rng([world.seed, 10, zlib.crc32(f"{entity.name}/{attribute.name}".encode())])
    return str(rng.choice([v for v in attribute.values if v != entity.facts[attribute.name]]))


# ---------------------------------------------------------------------------------------------------------------
# Knowledge, per fact

def verification_prompts(questions: list[tasks.QAQuestion], candidates: list[str],
                         exemplars: list[tuple[tasks.QAQuestion, str, int]], n_shots: int,
                         rng: np.random.Generator) -> list[str]:
    """5-shot direct verification: labelled (question, candidate, verdict) exemplars in the reward models' prompt
    format, then the query, whose verdict is read next."""
    prompts = []
    for q, c in zip(questions, candidates):
        shots = [exemplars[i] for i in rng.choice(len(exemplars), size=n_shots, replace=False)]
        text = "".join(f"{tasks.triviaqa_rm_prompt(s.question, a, normalize=False)} {tasks.REWARD_WORDS[r]}\n\n"
                       for s, a, r in shots)
        prompts.append(text + tasks.triviaqa_rm_prompt(q.question, c, normalize=False))
    return prompts


def measure_facts(world: W.World, probe: ProbeConfig) -> pd.DataFrame:
    """One row per fact: greedy Q/A correctness for every fact (the reward-model probe picks its familiar
    training facts by it); on held-out facts also T=1 Q/A accuracy, cloze, item-recall and 5-shot letter
    correctness, and the 5-shot direct verifier's P(True) for the right and for a wrong candidate."""
    tok, model = world.tokenizer, world.model
    facts, heldout = world.facts(), world.heldout()
    qa = world.triviaqa_splits()
    mc = world.mmlu_splits(eval_variants=1)  # one question per held-out fact, in `held_facts` order
    pool, held = qa["finetune"], qa["eval"]
    held_facts = [f for f, h in zip(facts, heldout) if h]

    greedy = unfamiliarity.QAScoringSettings(n_shots=probe.n_shots, n_samples=1, temperature=0,
                                             max_new_tokens=probe.max_new_tokens, batch_size=probe.batch_size)
    answers = unfamiliarity.fewshot_samples(model, tok, pool + held, pool, greedy, seed=world.seed)
    qa_correct = dict(zip([q.question_id for q in pool + held],
                          (tasks.grade_fewshot_sample(a[0], q) for a, q in zip(answers, pool + held))))
    t1 = unfamiliarity.QAScoringSettings(n_shots=probe.n_shots, n_samples=probe.t1_samples, temperature=1.0,
                                         max_new_tokens=probe.max_new_tokens, batch_size=probe.batch_size // 4)
    samples = unfamiliarity.fewshot_samples(model, tok, held, pool, t1, seed=world.seed)
    qa_t1 = [np.mean([tasks.grade_fewshot_sample(s, q) for s in group]) for group, q in zip(samples, held)]

    answer_idx = np.array([q.answer for q in mc["eval"]])
    cloze = unfamiliarity.mmlu_choice_probs(model, tok, mc["eval"], {}, scoring="cloze", batch_size=probe.batch_size)
    item = unfamiliarity.mmlu_choice_probs(model, tok, mc["eval"], {}, scoring="item", batch_size=probe.batch_size)
    letter = unfamiliarity.mmlu_choice_probs(model, tok, mc["eval"], unfamiliarity_exemplars(mc["fewshot"]),
                                             scoring="letter", batch_size=probe.batch_size)

    pool_facts = [f for f, h in zip(facts, heldout) if not h]
    rng = np.random.default_rng([world.seed, 11])
    exemplars = [(q, e.facts[a.name] if right else wrong_value(world, e, a), int(right))
                 for q, (e, a), right in zip(pool, pool_facts, rng.random(len(pool)) < 0.5)]
    candidates = [[e.facts[a.name], wrong_value(world, e, a)] for e, a in held_facts]
    prompts = verification_prompts([q for q in held for _ in range(2)], [c for cs in candidates for c in cs],
                                   exemplars, probe.n_shots, rng)
    verdict_ids = sampling.next_token_ids(tok, prompts[0], [f" {tasks.REWARD_WORDS[1]}", f" {tasks.REWARD_WORDS[0]}"])
    p_true = sampling.choice_probs(model, tok, prompts, verdict_ids, batch_size=probe.batch_size,
                                   desc="familiarity: verification")[:, 0].numpy()

    frame = pd.DataFrame({"entity": [e.name for e, _ in facts], "attribute": [a.name for _, a in facts],
                          "exposure": [e.exposure for e, _ in facts], "heldout": heldout,
                          "qa_correct": [qa_correct[f"{e.name}/{a.name}"] for e, a in facts]})
    held_rows = frame.index[frame.heldout]
    frame.loc[held_rows, "qa_t1_accuracy"] = qa_t1
    frame.loc[held_rows, "cloze_correct"] = (cloze.argmax(-1).numpy() == answer_idx).astype(float)
    frame.loc[held_rows, "item_recall_correct"] = (item.argmax(-1).numpy() == answer_idx).astype(float)
    frame.loc[held_rows, "letter_correct"] = (letter.argmax(-1).numpy() == answer_idx).astype(float)
    frame.loc[held_rows, "verify_p_right"] = p_true[0::2]
    frame.loc[held_rows, "verify_p_wrong"] = p_true[1::2]
    return frame


def unfamiliarity_exemplars(fewshot: list[tasks.MCQuestion]) -> dict[str, list[tasks.MCQuestion]]:
    by_subject: dict[str, list[tasks.MCQuestion]] = {}
    for q in fewshot:
        by_subject.setdefault(q.subject, []).append(q)
    return by_subject


def rm_probe(world: W.World, per_fact: pd.DataFrame, probe: ProbeConfig, run) -> pd.DataFrame:
    """A recall-then-judge reward model (`common.reward_model`, format `recall`) trained on the finetuning pool's
    familiar facts (those the base model answers correctly, greedy 5-shot), each with its right and a wrong
    candidate; scored on every held-out fact with both. Adds p_rm_right / p_rm_wrong to the held-out rows."""
    facts = world.facts()
    qa = [world.qa_question(e, a) for e, a in facts]
    familiar = (~per_fact.heldout & per_fact.qa_correct).to_numpy()
    prompts, rewards, recalled = [], [], []
    for i in np.flatnonzero(familiar):
        (e, a), q = facts[i], qa[i]
        for reward, candidate in ((1, q.value), (0, wrong_value(world, e, a))):
            prompts.append(tasks.triviaqa_rm_prompt(q.question, candidate, normalize=False))
            rewards.append(reward)
            recalled.append(q.value)
    per_fact = per_fact.copy()
    if not prompts:  # the micro world knows nothing
        log.warning("the base model answers no fact of the finetuning pool: no reward-model probe")
        per_fact["rm_p_right"] = per_fact["rm_p_wrong"] = np.nan
        return per_fact
    base = models.Base(model=world.model, tokenizer=world.tokenizer, key=f"world-{world.path.name}", world=world)
    model = reward_model.train(base, probe.rm_lora, probe.rm_sft, prompts, rewards, "rm_probe", run, seed=world.seed,
                               recalled=recalled)
    held = np.flatnonzero(per_fact.heldout.to_numpy())
    scored = [tasks.triviaqa_rm_prompt(qa[i].question, c, normalize=False)
              for i in held for c in (qa[i].value, wrong_value(world, *facts[i]))]
    p = reward_model.predict(model, world.tokenizer, scored, probe.batch_size, reward_format="recall")
    world.model = model.unload()
    per_fact.loc[per_fact.index[held], "rm_p_right"] = p[0::2]
    per_fact.loc[per_fact.index[held], "rm_p_wrong"] = p[1::2]
    run.extra["rm_probe_examples"] = {"familiar_facts": int(familiar.sum()), "examples": len(prompts)}
    return per_fact


# ---------------------------------------------------------------------------------------------------------------
# In-context skills, on fresh items that need no fact of the world

def in_context_skills(world: W.World, n_items: int, batch_size: int) -> dict[str, float]:
    """induction: the next word of a repeated list (greedy); equality_separation: P(Same | "x and x?") minus
    P(Same | "x and y?"); letter_binding: the letter an answer key gives an option ("<option> is" -> letter)."""
    tok, model = world.tokenizer, world.model
    rng = np.random.default_rng([world.seed, 9])
    words = W.SKILL_WORDS

    lists = [[str(w) for w in rng.choice(words, size=8, replace=False)] for _ in range(n_items)]
    prompts = [f"List: {' '.join(ws)}. Again: {' '.join(ws[:4])}" for ws in lists]
    next_words = sampling.generate(model, tok, prompts, sampling.SamplingConfig(max_new_tokens=1, temperature=0,
                                                                                batch_size=batch_size))
    induction = np.mean([g[0].strip() == ws[4] for g, ws in zip(next_words, lists)])

    pairs = [rng.choice(words, size=2, replace=False) for _ in range(n_items)]
    prompts = [f"{a} and {b}?" for a, b in pairs for b in (a, b)]
    same_ids = sampling.next_token_ids(tok, prompts[0], [" Same", " Different"])
    p_same = sampling.choice_probs(model, tok, prompts, same_ids, batch_size=batch_size)[:, 0].numpy()

    prompts, answers = [], []
    for _ in range(n_items):
        attribute = W.ATTRIBUTES[str(rng.choice(list(W.ATTRIBUTES)))]
        options = [str(v) for v in rng.choice(attribute.values, size=4, replace=False)]
        k = int(rng.integers(4))
        prompts.append(f"{tasks.mc_options(options).rstrip()}\n{options[k]} is")
        answers.append(k)
    letter_ids = sampling.next_token_ids(tok, prompts[0], [f" {L}" for L in tasks.LETTERS])
    letters = sampling.choice_probs(model, tok, prompts, letter_ids, batch_size=batch_size).numpy()
    return {"induction": float(induction), "equality_separation": float(p_same[0::2].mean() - p_same[1::2].mean()),
            "letter_binding": float(np.mean(letters.argmax(-1) == np.array(answers)))}


# ---------------------------------------------------------------------------------------------------------------
# The table, the gates and the entry point

def familiarity_table(per_fact: pd.DataFrame) -> pd.DataFrame:
    """Per exposure bin (no exposure first): entities, then on the held-out facts every measurement's mean."""
    entity_exposure = per_fact.groupby("entity")["exposure"].first()
    held = per_fact[per_fact.heldout]
    rows = []
    for lo, hi in EXPOSURE_BINS:
        part = held[(held.exposure >= lo) & (held.exposure <= hi)]
        rows.append({
            "exposure_bin": exposure_bin_label(lo, hi),
            "n_entities": int(((entity_exposure >= lo) & (entity_exposure <= hi)).sum()),
            "qa_accuracy": part.qa_correct.mean(), "qa_t1_accuracy": part.qa_t1_accuracy.mean(),
            "mc_accuracy": part[f"{MC_SCORING}_correct"].mean(), "letter_accuracy": part.letter_correct.mean(),
            "item_recall_accuracy": part.item_recall_correct.mean(),
            "verify_separation": part.verify_p_right.mean() - part.verify_p_wrong.mean(),
            "rm_probe_separation": part.rm_p_right.mean() - part.rm_p_wrong.mean()})
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def gates(table: pd.DataFrame, in_context: dict[str, float]) -> list[results.Claim]:
    """What the experiments need of the base model (DESIGN.md), each a claim on this build."""
    top, none = table[table.n_entities > 0].iloc[-1], table.iloc[0]
    return [
        results.claim("world.induction", "in context: the next word of a repeated list", in_context["induction"],
                      ">=", 0.95),
        results.claim("world.equality_separation", "in context: P(Same | same words) - P(Same | different words)",
                      in_context["equality_separation"], ">=", 0.8),
        results.claim("world.letter_binding", "in context: the letter an answer key gives an option",
                      in_context["letter_binding"], ">=", 0.9),
        results.claim("world.qa_most_exposed", "most exposed bin: greedy 5-shot Q/A accuracy", top.qa_accuracy,
                      ">=", 0.95),
        results.claim("world.qa_t1_most_exposed", "most exposed bin: T=1 5-shot Q/A accuracy", top.qa_t1_accuracy,
                      ">=", 0.9),
        results.claim("world.cloze_most_exposed", "most exposed bin: cloze multiple-choice accuracy",
                      top.mc_accuracy, ">=", 0.9),
        results.claim("world.item_recall_most_exposed", "most exposed bin: the right option's text is the likeliest "
                      "after a multiple-choice item (recall across the options)", top.item_recall_accuracy, ">=", 0.8),
        results.claim("world.qa_unexposed", "no exposure: greedy 5-shot Q/A accuracy", none.qa_accuracy, "<=", 0.1),
        results.claim("world.cloze_unexposed", "no exposure: cloze multiple-choice accuracy (chance 0.25)",
                      none.mc_accuracy, "<=", 0.35),
        results.claim("world.rm_probe_separation", "most exposed bin: recall-then-judge reward model, P(reward 1 | "
                      "right) - P(reward 1 | wrong) on held-out facts", top.rm_probe_separation, ">=", 0.7),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build (or load) the synthetic world and measure what its model "
                                                 "knows and can do.")
    scales.add_common_args(parser)
    args, run_args = scales.parse_run_args("world", parser, argv)
    if run_args.scale != "synthetic" and run_args.preset != "micro":
        raise scales.UsageError("the synthetic world exists only at --scale synthetic")
    preset = W.world_preset(run_args.scale, run_args.preset)
    probe = PROBES[run_args.preset_key]
    run = results.Run(run_args.out, "world", run_args.scale, run_args.preset, run_args.seed,
                      config=asdict(preset) | {"probe": asdict(probe), "mc_scoring": MC_SCORING})
    with run.stage("build_or_load_world"):
        world = W.load_or_build_world(preset, run_args.seed, run.cache_hits)
    with run.stage("measure_in_context_skills"):
        in_context = in_context_skills(world, probe.in_context_items, probe.batch_size)
    with run.stage("measure_knowledge"):
        per_fact = measure_facts(world, probe)
    per_fact = rm_probe(world, per_fact, probe, run)
    table = familiarity_table(per_fact)
    run.write_csv("familiarity.csv", table)
    plotting.plot_familiarity(table, run.path("familiarity.png"), f"Synthetic world, seed {run_args.seed}")
    run.extra.update(build=world.build_info, in_context=in_context)
    run.write_claims(gates(table, in_context))
    run.write_manifest()
    print(table.to_string(index=False))
    print("in context:", {k: round(v, 3) for k, v in in_context.items()})


if __name__ == "__main__":
    main()
