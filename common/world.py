"""The synthetic knowledge world (DESIGN.md): a knowledge base, a pretraining corpus in which each entity appears a
log-uniform number of times, a word-level tokenizer and a small Llama pretrained from scratch on that corpus.

What the model knows is whatever pretraining left it with; familiarity is always *measured* on the model (QA and
multiple-choice accuracy here, unfamiliarity scores in `common.unfamiliarity`), never read from exposure counts.

    python -m common.world --scale synthetic --seed 0
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from common import cache, plotting, results, sampling, scales, tasks, unfamiliarity

log = logging.getLogger(__name__)
WORLD_VERSION = 1  # bump when generation or training changes what a cached world would contain

# ---------------------------------------------------------------------------------------------------------------
# Knowledge base: closed value sets keep every fact one word long; 24-30 values per attribute keep the base
# model's blind-guess accuracy (the most frequent value) well below 0.1.

CITIES = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Dublin", "Vienna", "Madrid", "Lisbon", "Prague",
          "Athens", "Berlin", "Warsaw", "Toronto", "Boston", "Denver", "Sydney", "Mumbai", "Nairobi", "Seoul",
          "Havana", "Quito", "Helsinki", "Dakar", "Manila", "Hanoi", "Bogota", "Caracas", "Montreal")
YEARS = tuple(str(y) for y in range(1940, 1970))
OCCUPATIONS = ("painter", "chemist", "pilot", "architect", "novelist", "surgeon", "violinist", "lawyer",
               "astronomer", "sculptor", "engineer", "journalist", "botanist", "dancer", "economist", "photographer",
               "plumber", "chef", "teacher", "nurse", "farmer", "poet", "baker", "tailor")
EMPLOYERS = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark", "Wayne", "Cyberdyne", "Tyrell",
             "Soylent", "Wonka", "Aperture", "Oscorp", "Monarch", "Dunder", "Nakatomi", "Virtucon", "Massive",
             "Prestige", "Sirius", "Gekko", "Krusty", "Duff")
GENRES = ("comedy", "thriller", "western", "romance", "mystery", "horror", "musical", "drama", "fantasy", "satire",
          "documentary", "adventure", "biopic", "noir", "heist", "epic", "parody", "tragedy", "farce", "melodrama",
          "slasher", "anthology", "mockumentary", "spy")
RELEASE_YEARS = tuple(str(y) for y in range(1970, 2000))
SETTINGS = ("Venice", "Alaska", "Morocco", "Siberia", "Texas", "Peru", "Iceland", "Borneo", "Sicily", "Mongolia",
            "Nepal", "Chile", "Kenya", "Scotland", "Quebec", "Tasmania", "Bavaria", "Sahara", "Crete", "Lapland",
            "Bali", "Cuba", "Norway", "Ohio")
PROTAGONISTS = ("Alice", "Bruno", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Iris", "Jonas", "Kira",
                "Leo", "Maya", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Stefan", "Tess", "Ulla", "Viktor", "Wanda",
                "Yuri")


@dataclass(frozen=True)
class Attribute:
    name: str
    values: tuple[str, ...]
    question: str  # "{e}" is the entity name
    statements: tuple[str, ...]  # "{e}" entity, "{v}" value


PERSON_ATTRIBUTES = (
    Attribute("birth_city", CITIES, "Where was {e} born?", ("{e} was born in {v}.", "{e} is a native of {v}.")),
    Attribute("birth_year", YEARS, "In which year was {e} born?",
              ("{e} was born in the year {v}.", "The birth year of {e} is {v}.")),
    Attribute("occupation", OCCUPATIONS, "What is the occupation of {e}?",
              ("{e} works as a {v}.", "{e} is a {v} by profession.")),
    Attribute("employer", EMPLOYERS, "Which company does {e} work for?",
              ("{e} works for {v}.", "{e} is employed by {v}.")),
)
WORK_ATTRIBUTES = (
    Attribute("genre", GENRES, "What is the genre of {e}?", ("{e} is a {v} film.", "The genre of {e} is {v}.")),
    Attribute("release_year", RELEASE_YEARS, "In which year was {e} released?",
              ("{e} was released in {v}.", "{e} came out in {v}.")),
    Attribute("setting", SETTINGS, "Where is {e} set?", ("{e} is set in {v}.", "The story of {e} takes place in {v}.")),
    Attribute("protagonist", PROTAGONISTS, "Who is the protagonist of {e}?",
              ("The protagonist of {e} is {v}.", "{e} follows {v}.")),
)
ATTRIBUTES = {a.name: a for a in PERSON_ATTRIBUTES + WORK_ATTRIBUTES}

SYLLABLES = ("ka", "ro", "mi", "vel", "tan", "dor", "li", "sen", "bra", "ul", "zo", "fe", "nor", "qui", "ath",
             "er", "gal", "pim", "sha", "tov", "ux", "wen", "yar", "bel", "cor", "dri", "esh", "fin", "gor", "hal")

# Words the finetuning formats use, each shown in pretraining in some other context so its embedding is trained,
# while the formats themselves ("The answer is X.", "I don't know.", an E option, \boxed{}) never appear.
FILLER = (
    "You don't know the way.", "We know the town well.", "They don't like rain.", "I like the sea.",
    "Do you know the answer?", "Her answer was long.", "The question is hard.", "The sky is grey today.",
    "I see the hills.", "Is it late?", "The box is boxed and Unknown to us.", "Letters A, B, C, D and E come first.",
    "Write { and } and \\ in code.", "It is true.", "It is false.", "True or False?", "Yes, it is.", "No, it is not.",
    "I think so.", "We don't see it.", "The letter E is round.", "The word is short.", "Unknown people came.",
)


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str  # "person" or "work"
    facts: dict  # attribute name -> value
    exposure: int  # pretraining documents about this entity


@dataclass(frozen=True)
class WorldConfig:
    n_people: int = 500
    n_works: int = 250
    max_exposure: int = 127  # exposures are log-uniform integers in [0, max_exposure]
    doc_mix: tuple = (("statement", 0.4), ("qa", 0.2), ("mc", 0.1), ("profile", 0.3))
    n_comprehension_docs: int = 600  # in-context multiple-choice reading items: teach letter answering
    filler_repeats: int = 40
    trailing_space_frac: float = 0.3


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    context_length: int = 128


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 6
    batch_size: int = 16
    lr: float = 4e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.1


@dataclass(frozen=True)
class WorldPreset:
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


PRESETS = {
    "synthetic": WorldPreset(),
    # Seconds, for tests: the same code path on a tiny world; no claim is expected to hold.
    "micro": WorldPreset(
        world=WorldConfig(n_people=40, n_works=20, max_exposure=15, n_comprehension_docs=50, filler_repeats=2),
        model=ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          context_length=128),
        pretrain=PretrainConfig(epochs=1, batch_size=8),
    ),
}


def world_preset(scale: str, preset: str) -> WorldPreset:
    return PRESETS[scales.preset_key(scale, preset)]


# ---------------------------------------------------------------------------------------------------------------
# Generation


def make_names(n: int, rng: np.random.Generator, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        k = rng.integers(2, 4)
        name = "".join(rng.choice(SYLLABLES, size=k)).capitalize()
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def log_uniform_exposures(n: int, max_exposure: int, rng: np.random.Generator) -> np.ndarray:
    """Integers in [0, max_exposure] with log(1 + exposure) uniform: as many rare entities as famous ones."""
    return np.floor(np.exp(rng.uniform(0, math.log(max_exposure + 2), size=n))).astype(int) - 1


def build_knowledge_base(cfg: WorldConfig, seed: int) -> list[Entity]:
    rng = np.random.default_rng([seed, 1])
    taken: set[str] = set()
    entities = []
    for kind, n, attrs in (("person", cfg.n_people, PERSON_ATTRIBUTES), ("work", cfg.n_works, WORK_ATTRIBUTES)):
        names = make_names(n, rng, taken)
        exposures = log_uniform_exposures(n, cfg.max_exposure, rng)
        for name, exposure in zip(names, exposures):
            facts = {a.name: str(rng.choice(a.values)) for a in attrs}
            entities.append(Entity(name=name, kind=kind, facts=facts, exposure=int(exposure)))
    return entities


def attributes_of(entity: Entity) -> tuple[Attribute, ...]:
    return PERSON_ATTRIBUTES if entity.kind == "person" else WORK_ATTRIBUTES


def profile_sentence(entity: Entity) -> str:
    """A biography sentence (people) or a plot sentence (works) stating every fact."""
    f = entity.facts
    if entity.kind == "person":
        return (f"{entity.name} is a {f['occupation']} born in {f['birth_city']} in {f['birth_year']} "
                f"who works for {f['employer']}.")
    return (f"{entity.name} is a {f['release_year']} {f['genre']} film set in {f['setting']} "
            f"that follows {f['protagonist']}.")


def distractors(attribute: Attribute, correct: str, rng: np.random.Generator, k: int = 3) -> list[str]:
    others = [v for v in attribute.values if v != correct]
    return [str(v) for v in rng.choice(others, size=k, replace=False)]


def mc_item(entity: Entity, attribute: Attribute, rng: np.random.Generator) -> tasks.MCQuestion:
    correct = entity.facts[attribute.name]
    options = distractors(attribute, correct, rng)
    answer = int(rng.integers(4))
    options.insert(answer, correct)
    return tasks.MCQuestion(question=attribute.question.format(e=entity.name), subject=attribute.name,
                            choices=tuple(options), answer=answer)


def entity_document(entity: Entity, kind: str, rng: np.random.Generator) -> str:
    attrs = attributes_of(entity)
    if kind == "profile":
        return profile_sentence(entity)
    chosen = [attrs[i] for i in rng.choice(len(attrs), size=int(rng.integers(1, 3)), replace=False)]
    if kind == "statement":
        return " ".join(str(rng.choice(a.statements)).format(e=entity.name, v=entity.facts[a.name]) for a in chosen)
    if kind == "qa":
        return "\n\n".join(f"Q: {a.question.format(e=entity.name)}\nA: {entity.facts[a.name]}" for a in chosen)
    item = mc_item(entity, chosen[0], rng)  # an exam item with its letter answer, sometimes under MMLU's header
    body = f"{tasks.mc_block(item)} {tasks.LETTERS[item.answer]}"
    return tasks.mmlu_header(item.subject) + body if rng.random() < 0.3 else body


def comprehension_document(rng: np.random.Generator) -> str:
    """An in-context multiple-choice item whose answer is in the text: letter answering without knowledge."""
    attribute = ATTRIBUTES[str(rng.choice(list(ATTRIBUTES)))]
    who = str(rng.choice(PROTAGONISTS))
    value = str(rng.choice(attribute.values))
    fact = str(rng.choice(attribute.statements)).format(e=who, v=value)
    item = mc_item(Entity(who, "x", {attribute.name: value}, 0), attribute, rng)
    return f"{fact}\n{tasks.mc_block(item)} {tasks.LETTERS[item.answer]}"


def build_corpus(entities: list[Entity], cfg: WorldConfig, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 2])
    kinds, weights = zip(*cfg.doc_mix)
    docs = []
    for entity in entities:
        for kind in rng.choice(kinds, size=entity.exposure, p=np.array(weights) / sum(weights)):
            docs.append(entity_document(entity, str(kind), rng))
    docs += [comprehension_document(rng) for _ in range(cfg.n_comprehension_docs)]
    docs += list(FILLER) * cfg.filler_repeats
    # Some documents end in a space, as web text does: the lone-space token (Llama's "▁") is then a trained token,
    # as it must be, since the SFT formats put one at the end of prompts (", Answer: ") and before " </s>".
    docs = [d + " " if rng.random() < cfg.trailing_space_frac else d for d in docs]
    rng.shuffle(docs)
    return docs


def check_no_finetuning_formats(docs: list[str]) -> None:
    """Finetuning teaches these formats; pretraining must never show them."""
    forbidden = (tasks.ANSWER_PREFIX, "I don't know", "\\boxed", "E. ", "E) ")
    for doc in docs:
        for f in forbidden:
            if f in doc:
                raise AssertionError(f"finetuning format {f!r} leaked into the pretraining corpus: {doc!r}")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and model

SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>")
PIECE_PATTERN = r" ?[A-Za-z0-9]+| ?[^\sA-Za-z0-9]|\n| +"


def build_tokenizer(texts: list[str]):
    """A word-level tokenizer whose pieces carry their leading space (like sentencepiece's "▁"), so decoding is
    exact. Like Llama's tokenizer it prepends a space to every text it encodes (so a name at the start of a
    document is the same token as mid-sentence) and drops the first space when decoding. Every word gets both its
    bare and its space-prefixed piece."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    pieces: set[str] = {" ", "\n"}
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(" " + text):
            word = piece.lstrip(" ")
            if word:
                pieces.update((word, " " + word))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(sorted(pieces)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Prepend(" ")
    backend.pre_tokenizer = pre
    backend.decoder = decoders.Sequence([decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>", padding_side="left",
                                   clean_up_tokenization_spaces=False)


def build_model(cfg: ModelConfig, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.context_length * 2,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def pack_epoch(doc_ids: list[list[int]], eos: int, context: int, rng: np.random.Generator) -> torch.Tensor:
    """Shuffle documents, join them with EOS and cut the stream into rows of `context` tokens."""
    order = rng.permutation(len(doc_ids))
    stream = np.fromiter((t for i in order for t in (*doc_ids[i], eos)), dtype=np.int64)
    n_rows = len(stream) // context
    return torch.from_numpy(stream[: n_rows * context].reshape(n_rows, context))


def pretrain(model, tokenizer, docs: list[str], cfg: PretrainConfig, context: int, seed: int) -> dict:
    doc_ids = tokenizer(docs, add_special_tokens=False).input_ids
    rng = np.random.default_rng([seed, 3])
    rows_per_epoch = sum(len(d) + 1 for d in doc_ids) // context
    steps_per_epoch = max(1, rows_per_epoch // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    warmup = max(1, int(cfg.warmup_frac * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))))
    model.train()
    losses = []
    bar = tqdm(total=total, desc="pretrain world model")
    for _ in range(cfg.epochs):
        rows = pack_epoch(doc_ids, tokenizer.eos_token_id, context, rng)
        for b in range(steps_per_epoch):
            batch = rows[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            loss = model(input_ids=batch, labels=batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretraining loss is {loss.item()} at step {bar.n}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    bar.close()
    model.eval()
    return {"steps": total, "tokens_per_epoch": rows_per_epoch * context,
            "final_loss": float(np.mean(losses[-50:]))}


# ---------------------------------------------------------------------------------------------------------------
# The world object and its cache


@dataclass
class World:
    preset: WorldPreset
    seed: int
    entities: list[Entity]
    tokenizer: object
    model: object
    path: Path
    build_info: dict

    def facts(self) -> list[tuple[Entity, Attribute]]:
        return [(e, a) for e in self.entities for a in attributes_of(e)]

    def qa_question(self, entity: Entity, attribute: Attribute) -> tasks.QAQuestion:
        return tasks.QAQuestion(question=attribute.question.format(e=entity.name),
                                question_id=f"{entity.name}/{attribute.name}", value=entity.facts[attribute.name])

    def mc_question(self, entity: Entity, attribute: Attribute) -> tasks.MCQuestion:
        # Seeded per fact, so a question's options never depend on which other questions were asked.
        rng = np.random.default_rng([self.seed, 4, zlib.crc32(f"{entity.name}/{attribute.name}".encode())])
        return mc_item(entity, attribute, rng)

    def split_facts(self, question_of, eval_frac: float = 0.3) -> dict[str, list]:
        """Every fact as a question, split at random (seeded, the same split for every task view) into the
        finetuning and evaluation pools (MMLU's test/validation and TriviaQA's train/validation roles)."""
        facts = self.facts()
        is_eval = np.random.default_rng([self.seed, 6]).random(len(facts)) < eval_frac
        questions = [question_of(e, a) for e, a in facts]
        return {"finetune": [q for q, ev in zip(questions, is_eval) if not ev],
                "eval": [q for q, ev in zip(questions, is_eval) if ev]}

    def mmlu_splits(self, eval_frac: float = 0.3, n_fewshot: int = 5) -> dict[str, list[tasks.MCQuestion]]:
        """Multiple-choice questions in the roles of `data.load_mmlu`; few-shot exemplars come from the
        finetuning pool, five per subject."""
        splits = self.split_facts(self.mc_question, eval_frac)
        by_subject = {s: [q for q in splits["finetune"] if q.subject == s][:n_fewshot] for s in ATTRIBUTES}
        splits["fewshot"] = [q for questions in by_subject.values() for q in questions]
        return splits

    def triviaqa_splits(self, eval_frac: float = 0.3) -> dict[str, list[tasks.QAQuestion]]:
        """Short-answer questions in the roles of `data.load_triviaqa`."""
        return self.split_facts(self.qa_question, eval_frac)


def world_key(preset: WorldPreset, seed: int, docs: list[str]) -> str:
    """The cache key: the configuration, the seed and the corpus text itself, so any change to how the world is
    generated rebuilds it. Changes to training code bump WORLD_VERSION."""
    corpus_digest = hashlib.sha256("\x00".join(docs + FORMAT_TEXTS).encode()).hexdigest()
    return cache.config_hash(WORLD_VERSION, preset, seed, corpus_digest)


def load_or_build_world(preset: WorldPreset, seed: int, cache_hits: dict | None = None) -> World:
    """Load the pretrained world from the cache, or build and cache it (a half-built world is never mistaken for
    a finished one: `done.json` is written last)."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    entities = build_knowledge_base(preset.world, seed)
    docs = build_corpus(entities, preset.world, seed)
    path = cache.cache_root() / "world" / world_key(preset, seed, docs)
    hit = (path / "done.json").exists()
    if cache_hits is not None:
        cache_hits["world"] = hit
    if not hit:
        build_world(preset, seed, entities, docs, path)
    info = json.loads((path / "done.json").read_text())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer")
    tokenizer.padding_side = "left"
    model = LlamaForCausalLM.from_pretrained(path / "model")
    model.eval()
    return World(preset=preset, seed=seed, entities=entities, tokenizer=tokenizer, model=model, path=path,
                 build_info=info)


def build_world(preset: WorldPreset, seed: int, entities: list[Entity], docs: list[str], path: Path) -> None:
    t0 = time.time()
    check_no_finetuning_formats(docs)
    tokenizer = build_tokenizer(docs + FORMAT_TEXTS)
    model = build_model(preset.model, tokenizer, seed)
    log.info("world: %d entities, %d documents, vocab %d, model %.2fM parameters", len(entities), len(docs),
             len(tokenizer), sum(p.numel() for p in model.parameters()) / 1e6)
    stats = pretrain(model, tokenizer, docs, preset.pretrain, preset.model.context_length, seed)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path / "tokenizer")
    model.save_pretrained(path / "model")
    info = {"n_documents": len(docs), "vocab_size": len(tokenizer),
            "n_parameters": sum(p.numel() for p in model.parameters()), "pretrain_s": round(time.time() - t0, 2),
            **stats}
    results.write_json(path / "done.json", info)  # written last: its presence marks a complete world


# Every string the finetuning formats can produce must tokenize without <unk>.
FORMAT_TEXTS = [tasks.ANSWER_PREFIX + "x.", tasks.IDK, "E", "\\boxed{Unknown}", "A </s>", ", Answer: ",
                "A) B) C) D)", "True", "False", "Bio:", "Answer:"]


# ---------------------------------------------------------------------------------------------------------------
# Familiarity: what the pretrained model knows, measured by exposure bin

EXPOSURE_BINS = ((0, 0), (1, 2), (3, 5), (6, 10), (11, 20), (21, 40), (41, 80), (81, 10**9))


def exposure_bin_label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else (f"{lo}+" if hi >= 10**9 else f"{lo}-{hi}")


def measure_familiarity(world: World, n_shots: int = 5) -> tuple[pd.DataFrame, dict]:
    """Per fact: greedy few-shot QA correctness, cloze MC correctness and 5-shot letter MC correctness."""
    tok, model = world.tokenizer, world.model
    facts = world.facts()
    qa = [world.qa_question(e, a) for e, a in facts]
    mc = [world.mc_question(e, a) for e, a in facts]
    rng = np.random.default_rng([world.seed, 5])

    def shots(i: int, pool_size: int) -> np.ndarray:
        picks = rng.choice(pool_size - 1, size=n_shots, replace=False)
        return picks + (picks >= i)  # never the query itself

    qa_prompts = [tasks.qa_fewshot_prompt(q, [qa[j] for j in shots(i, len(qa))]) for i, q in enumerate(qa)]
    greedy = sampling.SamplingConfig(max_new_tokens=4, temperature=0, stop=("\n",), batch_size=128)
    answers = sampling.generate(model, tok, qa_prompts, greedy, desc="familiarity: QA")
    qa_correct = [tasks.grade_fewshot_sample(a[0], q) for a, q in zip(answers, qa)]

    answers_idx = np.array([q.answer for q in mc])
    cloze = unfamiliarity.mmlu_choice_probs(model, tok, mc, {}, scoring="cloze", batch_size=64)
    cloze_correct = cloze.argmax(-1).numpy() == answers_idx

    # Letter scoring as on MMLU: five fixed exemplars per subject (a "dev" set), which are left out of its column.
    dev: dict[str, list[int]] = {}
    for i in rng.permutation(len(mc)):
        if len(dev.setdefault(mc[i].subject, [])) < n_shots:
            dev[mc[i].subject].append(int(i))
    letter = unfamiliarity.mmlu_choice_probs(model, tok, mc, {s: [mc[i] for i in ids] for s, ids in dev.items()},
                                             scoring="letter", batch_size=64)
    letter_correct = (letter.argmax(-1).numpy() == answers_idx).astype(float)
    letter_correct[[i for ids in dev.values() for i in ids]] = np.nan

    per_fact = pd.DataFrame({
        "entity": [e.name for e, _ in facts], "attribute": [a.name for _, a in facts],
        "exposure": [e.exposure for e, _ in facts], "qa_correct": qa_correct,
        "cloze_correct": cloze_correct, "letter_correct": letter_correct,
    })
    return per_fact, {"qa": float(np.mean(qa_correct)), "cloze": float(np.mean(cloze_correct)),
                      "letter": float(np.nanmean(letter_correct))}


def familiarity_table(per_fact: pd.DataFrame, mc_scoring: str) -> pd.DataFrame:
    rows = []
    entity_exposure = per_fact.groupby("entity")["exposure"].first()
    for lo, hi in EXPOSURE_BINS:
        part = per_fact[(per_fact.exposure >= lo) & (per_fact.exposure <= hi)]
        rows.append({"exposure_bin": exposure_bin_label(lo, hi),
                     "n_entities": int(((entity_exposure >= lo) & (entity_exposure <= hi)).sum()),
                     "qa_accuracy": part.qa_correct.mean(), "mc_accuracy": part[f"{mc_scoring}_correct"].mean()})
    return pd.DataFrame(rows)


MC_SCORING = "cloze"  # see README: letter scoring stays near chance at this model size


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build (or load) the synthetic world and measure familiarity.")
    scales.add_common_args(parser)
    args, run_args = scales.parse_run_args("world", parser, argv)
    if run_args.scale != "synthetic" and run_args.preset != "micro":
        raise SystemExit("error: the synthetic world exists only at --scale synthetic")
    preset = world_preset(run_args.scale, run_args.preset)
    run = results.Run(run_args.out, "world", run_args.scale, run_args.preset, run_args.seed,
                      config=asdict(preset) | {"mc_scoring": MC_SCORING})
    with run.stage("build_or_load_world"):
        world = load_or_build_world(preset, run_args.seed, run.cache_hits)
    with run.stage("measure_familiarity"):
        per_fact, overall = measure_familiarity(world)
    table = familiarity_table(per_fact, MC_SCORING)
    run.write_csv("familiarity.csv", table)
    plotting.plot_familiarity(table, run.path("familiarity.png"), f"Synthetic world, seed {run_args.seed}")
    letter_table = familiarity_table(per_fact, "letter").rename(columns={"mc_accuracy": "letter_accuracy"})
    run.extra.update(build=world.build_info, overall_accuracy=overall,
                     letter_accuracy_by_bin=dict(zip(letter_table.exposure_bin, letter_table.letter_accuracy)))
    run.write_manifest()
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
