"""The synthetic knowledge world (DESIGN.md): a knowledge base, a pretraining corpus in which each entity appears a
log-uniform number of times plus documents that grow in-context skills, a word-level tokenizer and a small Llama
pretrained from scratch on that corpus.

What the model knows and can do is whatever pretraining left it with; it is always *measured* on the model
(`common.familiarity`, unfamiliarity scores in `common.unfamiliarity`), never read from exposure counts.

    python -m common.world --scale synthetic --seed 0    # build (or load) the world and measure it
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common import cache, results, scales, tasks

log = logging.getLogger(__name__)
WORLD_VERSION = 2  # bump when generation or training changes what a cached world would contain

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
# exp05's world (`WorldConfig.country_majority`) gives every entity a country as well, most of them the first one:
# the vaguer fact the paper's conservative policy writes about an unfamiliar entity ("an American actor"), which a
# prior guess gets right. Kept out of ATTRIBUTES, which the questions of exp01-04 and the skill documents draw on.
COUNTRIES = ("Ardenia", "Borovia", "Calderra", "Dunmar", "Estrel", "Fenwick")
COUNTRY = Attribute("country", COUNTRIES, "Where is {e} from?", ("{e} is from {v}.", "{e} comes from {v}."))
FACT_ATTRIBUTES = {**ATTRIBUTES, COUNTRY.name: COUNTRY}  # every attribute an entity's facts can name

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
    # words of the later experiments' prompts: the long-form tasks (exp05) and SimpleFact's prefixes (exp06)
    "Her biography is long.", "Write to me.", "The premise of the story is odd.", "One fact is enough.",
    "Each plot point is correct.", "The following candidates came.", "Be cautious.", "Be balanced.", "Be bold.",
)


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str  # "person" or "work"
    facts: dict  # attribute name -> value
    exposure: int  # pretraining documents about this entity


@dataclass(frozen=True)
class SkillConfig:
    """In-context skill documents, written afresh for every epoch. None states a fact of the world: they exist so
    that the model learns to read its context (DESIGN.md "In-context skills"), which documents that each state one
    or two facts never require."""

    induction: int = 8000  # "List: Oslo comedy 1957. Again: Oslo comedy 1957." (repeated spans)
    equality: int = 6000  # "Oslo and Lima? Different." (compare two words in context)
    membership: int = 12000  # "Oslo 1957 comedy Lima. Lima? Yes." (find a word anywhere in the context)
    answer_keys: int = 16000  # options "A) Oslo B) Lima ...", then entries "Lima B." / "Lima is B." / "B is Lima."
    key_entries: int = 3  # entries per answer key, each about a different option
    lead_epochs: int = 0  # epochs of skill documents alone before the knowledge documents join


@dataclass(frozen=True)
class WorldConfig:
    n_people: int = 500
    n_works: int = 250
    max_exposure: int = 127  # exposures are log-uniform integers in [0, max_exposure]
    doc_mix: tuple = (("statement", 0.4), ("qa", 0.2), ("mc", 0.1), ("profile", 0.3))
    # The share of multiple-choice items answered with the right option's text rather than its letter. With letters
    # only, the model never learnt to recall a fact across the four options: before any finetuning, the right
    # option's text is the likeliest after an item for 0.23 of the most familiar evaluation questions (seed 2;
    # chance; 1.00 after "Q: ...\nA:"). Half the items by text: 0.92 on seed 2, 0.60 on seed 1; all of them: 0.94
    # on seed 1. exp03's MMLU claims on these worlds are in its README (session of 2026-11-24).
    mc_text_answers: float = 1.0
    # The held-out share of facts: never written as a multiple-choice item, so every skill measured on them has
    # generalised; they are also the experiments' evaluation pool (`World.split_facts`).
    heldout_frac: float = 0.3
    max_passages: int = 6  # statements or Q/A pairs per document
    # Share of entities from COUNTRIES[0], the rest spread evenly over the others; 0: no country fact. exp05 only
    # (its README: without a fact a prior guess gets right, every method's fraction of true facts on unfamiliar
    # entities is about 0, so abstaining and hallucinating score alike).
    country_majority: float = 0.0
    skills: SkillConfig = field(default_factory=SkillConfig)
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
    # In-context skills form or not per build at 9 epochs (letter binding 0.77 on seed 1, 0.995 on seeds 0 and 2;
    # induction 0.875 on seed 0 with every item answered by text); at 12 every gate holds on seeds 0-2 (README).
    epochs: int = 12
    batch_size: int = 16
    lr: float = 4e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    bf16: bool = True  # autocast; measured 1.2x faster than fp32 on this CPU (AVX-512 BF16), see README


@dataclass(frozen=True)
class WorldPreset:
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


PRESETS = {
    "synthetic": WorldPreset(),
    # Seconds, for tests: the same code path on a tiny world; no claim is expected to hold.
    "micro": WorldPreset(
        world=WorldConfig(n_people=40, n_works=20, max_exposure=15, filler_repeats=2,
                          skills=SkillConfig(induction=20, equality=40, answer_keys=40)),
        model=ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          context_length=128),
        pretrain=PretrainConfig(epochs=1, batch_size=8),
    ),
}


def world_preset(scale: str, preset: str, country_majority: float = 0.0) -> WorldPreset:
    chosen = PRESETS[scales.preset_key(scale, preset)]
    return replace(chosen, world=replace(chosen.world, country_majority=country_majority)) if country_majority \
        else chosen


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
    if not cfg.country_majority:
        return entities
    rng = np.random.default_rng([seed, 8])  # its own stream: every other fact is the country-free world's
    return [replace(e, facts={**e.facts, COUNTRY.name: COUNTRIES[0] if rng.random() < cfg.country_majority
                              else str(rng.choice(COUNTRIES[1:]))}) for e in entities]


def attributes_of(entity: Entity) -> tuple[Attribute, ...]:
    return tuple(FACT_ATTRIBUTES[name] for name in entity.facts)


def all_facts(entities: list[Entity]) -> list[tuple[Entity, Attribute]]:
    return [(e, a) for e in entities for a in attributes_of(e)]


def heldout_mask(n_facts: int, frac: float, seed: int) -> np.ndarray:
    """Which facts (in `all_facts` order) are held out: seeded, independent of exposure."""
    return np.random.default_rng([seed, 6]).random(n_facts) < frac


# The grammar of profile sentences: exp05's targets, and what its exact fact checker parses (`common.factscore`).
PROFILE_TEMPLATES = {
    "person": "{name} is a {occupation} born in {birth_city} in {birth_year} who works for {employer}.",
    "work": "{name} is a {release_year} {genre} film set in {setting} that follows {protagonist}.",
    # with a country, it leads: a response can state it and stop
    "person+country": "{name} is from {country}, a {occupation} born in {birth_city} in {birth_year} who works for "
                      "{employer}.",
    "work+country": "{name} is from {country}, a {release_year} {genre} film set in {setting} that follows "
                    "{protagonist}.",
}


def profile_template(entity: Entity) -> str:
    return PROFILE_TEMPLATES[entity.kind + ("+country" if COUNTRY.name in entity.facts else "")]


def profile_sentence(entity: Entity, n_facts: int | None = None) -> str:
    """A biography sentence (people) or a plot sentence (works) stating every fact, or only its first `n_facts`
    clauses ("Ada is from Ardenia, a poet.")."""
    pieces = re.split(r"(\{\w+\})", profile_template(entity))  # "", "{name}", literal, "{field}", literal, ...
    template = "".join(pieces) if n_facts is None else "".join(pieces[: 2 * n_facts + 2]) + "."
    return template.format(name=entity.name, **entity.facts)


def noisy_profile(entity: Entity, error_rate: float, rng: np.random.Generator) -> str:
    """The profile sentence of a writer that knows every entity equally well: each fact independently replaced by
    another value of its attribute with probability `error_rate` (exp05's standard reward model's data)."""
    facts = {name: distractors(FACT_ATTRIBUTES[name], value, rng, k=1)[0] if rng.random() < error_rate else value
             for name, value in entity.facts.items()}
    return profile_template(entity).format(name=entity.name, **facts)


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


def entity_document(entity: Entity, kind: str, rng: np.random.Generator,
                    attrs: tuple[Attribute, ...] | None = None, *, mc_text_answers: float) -> str:
    """One pretraining document about `entity` stating facts of `attrs` (default: all its attributes); a
    multiple-choice item is answered with its option's text with probability `mc_text_answers`, else its letter."""
    attrs = attributes_of(entity) if attrs is None else attrs
    if kind == "profile":
        return profile_sentence(entity)
    chosen = [attrs[i] for i in rng.choice(len(attrs), size=min(len(attrs), int(rng.integers(1, 3))), replace=False)]
    if kind == "statement":
        return " ".join(str(rng.choice(a.statements)).format(e=entity.name, v=entity.facts[a.name]) for a in chosen)
    if kind == "qa":
        return "\n\n".join(f"Q: {a.question.format(e=entity.name)}\nA: {entity.facts[a.name]}" for a in chosen)
    item = mc_item(entity, chosen[0], rng)  # an exam item with its answer, sometimes under MMLU's header
    answer = item.choices[item.answer] if rng.random() < mc_text_answers else tasks.LETTERS[item.answer]
    body = f"{tasks.mc_block(item)} {answer}"
    return tasks.mmlu_header(item.subject) + body if rng.random() < 0.3 else body


GROUPED = {"statement": " ", "qa": "\n\n"}  # passages of these kinds share documents, joined by the separator


def knowledge_documents(entities: list[Entity], cfg: WorldConfig, seed: int) -> list[str]:
    """`exposure` passages per entity; a multiple-choice item never asks about a held-out fact. Statements and Q/A
    pairs about different entities are grouped into documents of 1 to `max_passages` passages (a quiz page, a
    paragraph), as web text mixes entities: with attention kept inside each document, a model that never read
    unrelated facts side by side copies from them when a few-shot prompt puts them there (measured: README)."""
    rng = np.random.default_rng([seed, 2])
    kinds, weights = zip(*cfg.doc_mix)
    p = np.array(weights) / sum(weights)
    heldout = heldout_mask(len(all_facts(entities)), cfg.heldout_frac, seed)
    docs, passages, i = [], {kind: [] for kind in GROUPED}, 0
    for entity in entities:
        attrs = attributes_of(entity)
        askable = tuple(a for j, a in enumerate(attrs) if not heldout[i + j])
        i += len(attrs)
        for kind in rng.choice(kinds, size=entity.exposure, p=p):
            if kind == "mc" and not askable:
                kind = "statement"
            text = entity_document(entity, str(kind), rng, askable if kind == "mc" else None,
                                  mc_text_answers=cfg.mc_text_answers)
            (passages[kind] if kind in GROUPED else docs).append(text)
    for kind, separator in GROUPED.items():
        items = [passages[kind][j] for j in rng.permutation(len(passages[kind]))]
        while items:
            n = int(rng.integers(1, cfg.max_passages + 1))
            docs.append(separator.join(items[:n]))
            items = items[n:]
    return docs


# In-context skill documents draw their words from the attribute values: every such word is a trained token, and
# no entity name appears, so the names of entities with no exposure stay unseen.
SKILL_WORDS = tuple(sorted({v for a in PERSON_ATTRIBUTES + WORK_ATTRIBUTES for v in a.values}))


def induction_document(rng: np.random.Generator) -> str:
    words = [str(w) for w in rng.choice(SKILL_WORDS, size=int(rng.integers(5, 10)), replace=False)]
    return f"List: {' '.join(words)}. Again: {' '.join(words)}."


def equality_document(rng: np.random.Generator) -> str:
    a = str(rng.choice(SKILL_WORDS))
    b = a if rng.random() < 0.5 else str(rng.choice([w for w in SKILL_WORDS if w != a]))
    return f"{a} and {b}? {'Same' if a == b else 'Different'}."


MEMBERSHIP_ANSWERS = (("Yes", "No"), ("True", "False"))


def membership_document(rng: np.random.Generator) -> str:
    """A few words, then one asked about: is it among them? Answered Yes/No or True/False, so both pairs of words
    are trained as answers to a comparison (a reward model's verdict is True/False)."""
    words = [str(w) for w in rng.choice(SKILL_WORDS, size=int(rng.integers(1, 7)), replace=False)]
    query = str(rng.choice(words)) if rng.random() < 0.5 else str(rng.choice([w for w in SKILL_WORDS
                                                                                 if w not in words]))
    yes, no = MEMBERSHIP_ANSWERS[int(rng.integers(len(MEMBERSHIP_ANSWERS)))]
    return f"{' '.join(words)}. {query}? {yes if query in words else no}."


KEY_FORMS = ("{text} {letter}.", "{text} is {letter}.", "{letter} is {text}.")  # entries of an answer key


def answer_key_document(rng: np.random.Generator, n_entries: int) -> str:
    """Four options of one attribute laid out as Exp.1 lists them, then entries that read letters off the options
    (and options off letters). The entry with nothing between word and letter is the one a small model learns
    first; with it, the one with a word in between follows (measured: README)."""
    attribute = ATTRIBUTES[str(rng.choice(list(ATTRIBUTES)))]
    options = [str(v) for v in rng.choice(attribute.values, size=4, replace=False)]
    entries = [str(rng.choice(KEY_FORMS)).format(text=options[k], letter=tasks.LETTERS[k])
               for k in rng.permutation(4)[:n_entries]]
    return f"{tasks.mc_options(options).rstrip()}\n{' '.join(entries)}"


def skill_documents(cfg: SkillConfig, seed: int, epoch: int) -> list[str]:
    rng = np.random.default_rng([seed, 7, epoch])
    return ([induction_document(rng) for _ in range(cfg.induction)]
            + [equality_document(rng) for _ in range(cfg.equality)]
            + [membership_document(rng) for _ in range(cfg.membership)]
            + [answer_key_document(rng, cfg.key_entries) for _ in range(cfg.answer_keys)])


def epoch_documents(knowledge: list[str], cfg: WorldConfig, seed: int, epoch: int) -> list[str]:
    """What one pretraining epoch reads: the knowledge documents (from the lead-in epochs on), fresh skill
    documents and the filler, shuffled."""
    rng = np.random.default_rng([seed, 8, epoch])
    docs = (knowledge if epoch >= cfg.skills.lead_epochs else []) + skill_documents(cfg.skills, seed, epoch)
    docs = docs + list(FILLER) * cfg.filler_repeats
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
            pieces.update((word, " " + word) if word else (piece,))  # a run of spaces is a piece of its own
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


def pack_epoch(doc_ids: list[list[int]], eos: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Join the documents (in the given order) with EOS and cut the stream into rows of `context` tokens.
    Returns the rows and their position ids, which restart at every document, so attention stays inside one
    document (transformers reads restarting position ids as packed sequences): an in-context skill is then
    learnt from its own document, never from a neighbour that happens to share a word."""
    stream = np.fromiter((t for d in doc_ids for t in (*d, eos)), dtype=np.int64)
    positions = np.fromiter((p for d in doc_ids for p in range(len(d) + 1)), dtype=np.int64)
    n_rows = len(stream) // context
    shape = (n_rows, context)
    return (torch.from_numpy(stream[: n_rows * context].reshape(shape)),
            torch.from_numpy(positions[: n_rows * context].reshape(shape)))


def pretrain(model, tokenizer, epoch_docs, cfg: PretrainConfig, context: int, log_every: int = 50) -> dict:
    """Next-token prediction over `cfg.epochs` epochs; `epoch_docs(epoch)` gives each epoch's shuffled documents.
    AdamW (no decay on embeddings and norms), linear warm-up, cosine decay to a tenth of the peak rate."""
    epochs = [tokenizer(epoch_docs(e), add_special_tokens=False).input_ids for e in range(cfg.epochs)]
    rows_per_epoch = [sum(len(d) + 1 for d in ids) // context for ids in epochs]
    steps = [max(1, rows // cfg.batch_size) for rows in rows_per_epoch]
    total = sum(steps)
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
    for ids, n_steps in zip(epochs, steps):
        rows, positions = pack_epoch(ids, tokenizer.eos_token_id, context)
        for b in range(n_steps):
            batch = rows[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            pos = positions[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            labels = batch.masked_fill(pos == 0, -100)  # a document's first token is not predicted from the last
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = model(input_ids=batch, position_ids=pos, labels=labels, use_cache=False).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretraining loss is {loss.item()} at step {bar.n + 1}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1)
            if bar.n % log_every == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.3f}")
    bar.close()
    model.eval()
    return {"steps": total, "tokens": sum(rows_per_epoch) * context,
            "final_loss": float(np.mean(losses[-50:]))}


# ---------------------------------------------------------------------------------------------------------------
# The world object and its cache


# Each held-out fact is asked this many times in the MMLU evaluation pool (a synthetic-scale deviation: MMLU asks
# each question once). With one question per fact the 12-epoch world leaves 29-36 questions in exp01's most
# unfamiliar bin (seeds 0 / 1 / 2), where sampling noise alone puts the largest of dist.1's 16 letter means about
# 0.11 from uniform against the claim's 0.10 (measured 0.129 / 0.135 / 0.119). With eight: 216 / 299 / 219
# questions there, 0.059 / 0.076 / 0.048 (exp01 README).
MMLU_EVAL_VARIANTS = 8


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
        return all_facts(self.entities)

    def heldout(self) -> np.ndarray:
        """Per fact (in `facts()` order): held out of the multiple-choice documents and put in the evaluation
        pool."""
        return heldout_mask(len(self.facts()), self.preset.world.heldout_frac, self.seed)

    def qa_question(self, entity: Entity, attribute: Attribute) -> tasks.QAQuestion:
        return tasks.QAQuestion(question=attribute.question.format(e=entity.name),
                                question_id=f"{entity.name}/{attribute.name}", value=entity.facts[attribute.name])

    def mc_question(self, entity: Entity, attribute: Attribute, variant: int = 0) -> tasks.MCQuestion:
        # Seeded per fact (and variant), so a question's options never depend on which other questions were asked;
        # variant 0 is the one question of the finetuning pool.
        rng = np.random.default_rng([self.seed, 4, zlib.crc32(f"{entity.name}/{attribute.name}".encode())]
                                    + ([variant] if variant else []))
        return mc_item(entity, attribute, rng)

    def split_facts(self, question_of) -> dict[str, list]:
        """Every fact as a question, in the finetuning pool or, if held out, the evaluation pool (MMLU's
        test/validation and TriviaQA's train/validation roles)."""
        questions = [question_of(e, a) for e, a in self.facts()]
        heldout = self.heldout()
        return {"finetune": [q for q, h in zip(questions, heldout) if not h],
                "eval": [q for q, h in zip(questions, heldout) if h]}

    def mmlu_splits(self, n_fewshot: int = 5,
                    eval_variants: int = MMLU_EVAL_VARIANTS) -> dict[str, list[tasks.MCQuestion]]:
        """Multiple-choice questions in the roles of `data.load_mmlu`; few-shot exemplars come from the
        finetuning pool, five per subject. Each held-out fact is asked `eval_variants` times in the evaluation
        pool, each time with fresh distractors (variant 0 of every fact first, then variant 1, ...)."""
        splits = self.split_facts(self.mc_question)
        held = [f for f, h in zip(self.facts(), self.heldout()) if h]
        splits["eval"] += [self.mc_question(e, a, v) for v in range(1, eval_variants) for e, a in held]
        by_subject = {s: [q for q in splits["finetune"] if q.subject == s][:n_fewshot] for s in ATTRIBUTES}
        splits["fewshot"] = [q for questions in by_subject.values() for q in questions]
        return splits

    def triviaqa_splits(self) -> dict[str, list[tasks.QAQuestion]]:
        """Short-answer questions in the roles of `data.load_triviaqa`."""
        return self.split_facts(self.qa_question)

    def longform_splits(self, task: str, shortened: float = 0.0) -> dict[str, list[tasks.LongformItem]]:
        """Biographies (people) or plot premises (works) in the roles of `data.load_wikibios` / `load_wikiplots`:
        each entity's profile sentence is its reference, for a seeded share `shortened` of them cut after a random
        earlier clause (references, like Wikipedia's first sentences, differ in detail); a seeded `heldout_frac` of
        the entities evaluates."""
        kind = {"bio": "person", "plot": "work"}[task]
        entities = [e for e in self.entities if e.kind == kind]
        rng = np.random.default_rng([self.seed, 9])
        cuts = [int(rng.integers(1, len(e.facts))) if rng.random() < shortened else None for e in entities]
        items = [tasks.LongformItem(task, e.name, profile_sentence(e, n)) for e, n in zip(entities, cuts)]
        heldout = np.random.default_rng([self.seed, 7]).random(len(items)) < self.preset.world.heldout_frac
        return {"finetune": [it for it, h in zip(items, heldout) if not h],
                "eval": [it for it, h in zip(items, heldout) if h]}


def world_key(preset: WorldPreset, seed: int, corpus: list[str]) -> str:
    """The cache key: the configuration, the seed and the corpus text itself (the knowledge documents and the
    first epoch), so any change to how the world is generated rebuilds it. Changes to training code bump
    WORLD_VERSION."""
    corpus_digest = hashlib.sha256("\x00".join(corpus + FORMAT_TEXTS).encode()).hexdigest()
    config = cache.canonical(preset)
    if not preset.world.country_majority:  # a country-free world keeps the key (and cache) it had before the field
        del config["world"]["country_majority"]
    return cache.config_hash(WORLD_VERSION, config, seed, corpus_digest)


def load_or_build_world(preset: WorldPreset, seed: int, cache_hits: dict | None = None) -> World:
    """Load the pretrained world from the cache, or build and cache it (a half-built world is never mistaken for
    a finished one: `done.json` is written last)."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    entities = build_knowledge_base(preset.world, seed)
    knowledge = knowledge_documents(entities, preset.world, seed)
    first_epoch = epoch_documents(knowledge, preset.world, seed, 0)
    path = cache.cache_root() / "world" / world_key(preset, seed, knowledge + first_epoch)
    hit = (path / "done.json").exists()
    if cache_hits is not None:
        cache_hits["world"] = hit
    if not hit:
        build_world(preset, seed, entities, knowledge, path)
    info = json.loads((path / "done.json").read_text())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer")
    tokenizer.padding_side = "left"
    model = LlamaForCausalLM.from_pretrained(path / "model")
    model.eval()
    return World(preset=preset, seed=seed, entities=entities, tokenizer=tokenizer, model=model, path=path,
                 build_info=info)


def build_world(preset: WorldPreset, seed: int, entities: list[Entity], knowledge: list[str], path: Path) -> None:
    t0 = time.time()

    def epoch_docs(epoch: int) -> list[str]:
        docs = epoch_documents(knowledge, preset.world, seed, epoch)
        check_no_finetuning_formats(docs)
        return docs

    # Every entity's name is a token, the names of entities that no document mentions included (their embeddings
    # stay untrained): an unseen name is then a word the model has never read, not the shared <unk>.
    tokenizer = build_tokenizer(knowledge + epoch_docs(0) + [e.name for e in entities] + FORMAT_TEXTS)
    model = build_model(preset.model, tokenizer, seed)
    log.info("world: %d entities, %d knowledge documents, vocab %d, model %.2fM parameters", len(entities),
             len(knowledge), len(tokenizer), sum(p.numel() for p in model.parameters()) / 1e6)
    stats = pretrain(model, tokenizer, epoch_docs, preset.pretrain, preset.model.context_length)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path / "tokenizer")
    model.save_pretrained(path / "model")
    info = {"n_knowledge_documents": len(knowledge), "vocab_size": len(tokenizer),
            "n_parameters": sum(p.numel() for p in model.parameters()), "pretrain_s": round(time.time() - t0, 2),
            **stats}
    results.write_json(path / "done.json", info)  # written last: its presence marks a complete world


# Every string the finetuning formats can produce must tokenize without <unk>.
FORMAT_TEXTS = [tasks.ANSWER_PREFIX + "x.", tasks.IDK, "E", "\\boxed{Unknown}", "A </s>", ", Answer: ",
                "A) B) C) D)", "True", "False", "(A)", "Write a biography for x.", 'What is the premise of "x"?',
                " Bio: x", " Answer: x", "Fact 1: Fact 2: Fact 3: Fact 4: Fact 5: Fact 6: Fact 7: Fact 8:",
                "Is the answer to the question correct? Yes. No.", 'Is the following a plot point in "x"?',
                "Candidates: x, y.", "cautious balanced bold"]


if __name__ == "__main__":
    from common.familiarity import main

    main()
