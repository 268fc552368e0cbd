"""Fact labelling, FActScore-style (SPEC.md 6.5): a response is split into atomic facts and each fact is judged
supported or not by a knowledge source. One interface, two backends:

- `WorldFactChecker` (synthetic scale): exact. The world's grammar (`world.PROFILE_TEMPLATES`) splits a response
  into one fact per clause, and the knowledge base decides each.
- `OpenAIFactChecker` (paper scale): FActScore's two steps through the real `openai` client, atomic facts per
  sentence, then a True/False judgement per fact against the topic's best-matching passages of a local Wikipedia
  dump (FActScore's sqlite schema). Every call is cached on disk by model, settings and prompt, so a rerun makes
  no calls.

`label(topic, text)` returns the facts, or None where the checker can make no decision (a topic missing from the
knowledge source); None counts as zero facts and a fraction of 0, as in the authors' notebook.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sqlite3
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from common import cache, results
from common.scales import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fact:
    text: str
    supported: bool


class FactChecker(Protocol):
    key: str  # names what the labels depend on, for cache keys
    workers: int  # responses labelled at once (`label_all`): overlapping API calls pays, exact labels do not need it

    def label(self, topic: str, text: str) -> list[Fact] | None: ...


def fact_counts(facts: list[Fact] | None) -> tuple[int, int]:
    """(true, false) facts; no decision counts as none."""
    if not facts:
        return 0, 0
    n_true = sum(f.supported for f in facts)
    return n_true, len(facts) - n_true


def fraction_true(facts: list[Fact] | None) -> float:
    """The table's statistic (SPEC.md 6.6): true / all facts, 0 without a decision or without facts."""
    n_true, n_false = fact_counts(facts)
    return n_true / (n_true + n_false) if n_true + n_false else 0.0


FUNCTION_WORDS = {"a", "an", "the", "is", "was", "are", "in", "of", "and", "as", "for", "by", "to", "on", "at", "who",
                  "that", "with", "it", "he", "she", "his", "her"}


def mark_unsupported(text: str, facts: list[Fact] | None, topic: str) -> list[tuple[str, bool]]:
    """The response's words, each marked when it appears in an unsupported fact and in neither a supported fact
    nor the topic (function words never): Fig. 8's highlighting of what the labeller marks unsupported (SPEC.md
    6.6 [PROPOSED])."""
    def words(s: str) -> set[str]:
        return {w.lower() for w in re.findall(r"\w+", s)} - FUNCTION_WORDS

    supported = words(topic).union(*(words(f.text) for f in facts or [] if f.supported))
    wrong = set().union(*(words(f.text) for f in facts or [] if not f.supported)) - supported
    return [(w, bool(words(w) & wrong)) for w in text.split()]


def label_all(checker: FactChecker, topics: Sequence[str], texts: Sequence[str | None]) -> list[list[Fact] | None]:
    """Label many responses, `checker.workers` at a time; None texts (invalid generations) stay None."""
    def one(pair):
        topic, text = pair
        return None if text is None else checker.label(topic, text)

    with ThreadPoolExecutor(max_workers=checker.workers) as pool:
        return list(pool.map(one, zip(topics, texts)))


# ---------------------------------------------------------------------------------------------------------------
# Synthetic scale: the world's grammar and knowledge base


def clause_patterns(template: str) -> dict[str, re.Pattern]:
    """For each attribute of a profile template, a pattern for its clause: the words before the value, reaching
    back over the previous value where those words alone are ambiguous (" in " of "born in X in 1950"), so each
    clause is found wherever it appears, whatever else the response says."""
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ..., literal
    patterns = {}
    for i in range(3, len(parts), 2):
        left = re.escape(parts[i - 1])
        if template.count(parts[i - 1]) > 1:
            left = rf"{re.escape(parts[i - 3])}\S+{left}"
        patterns[parts[i]] = re.compile(rf"{left}(\w+)")
    return patterns


class WorldFactChecker:
    """Exact labels at synthetic scale: every clause of the profile grammar found in the response is one atomic
    fact about the topic entity, supported iff its value is the knowledge base's."""

    workers = 1

    def __init__(self, entities):
        from common import world

        self.entities = {e.name: e for e in entities}
        self.attributes = world.FACT_ATTRIBUTES
        self.template = world.profile_template
        self.patterns = {t: clause_patterns(t) for t in world.PROFILE_TEMPLATES.values()}
        self.key = cache.config_hash("world-grammar", world.PROFILE_TEMPLATES, entities)
        # the facts `label` writes, read back: "{e} was born in {v}." with one word each
        self.statement_patterns = [(a, re.compile(re.escape(a.statements[0]).replace(r"\{e\}", r"(?P<e>\S+)")
                                                  .replace(r"\{v\}", r"(?P<v>\S+)") + "$"))
                                   for a in self.attributes.values()]

    def label(self, topic: str, text: str) -> list[Fact] | None:
        entity = self.entities.get(topic)
        if entity is None:
            return None
        found = []
        for name, pattern in self.patterns[self.template(entity)].items():
            for match in pattern.finditer(text):
                value = match.group(1)
                statement = self.attributes[name].statements[0].format(e=topic, v=value)
                found.append((match.start(1), Fact(statement, value == entity.facts[name])))
        return [fact for _, fact in sorted(found, key=lambda pair: pair[0])]

    def read_statement(self, fact: str, topic: str | None = None) -> tuple[str, str, str] | None:
        """A fact as `label` writes it, read back into (question, candidate answer, the knowledge base's answer);
        None for anything else. With `topic` the fact is about the topic whatever its subject word says (exp05's
        classifier is told the prompt's entity, as the paper's plot classifier is told the title)."""
        for attribute, pattern in self.statement_patterns:
            match = pattern.search(fact.strip())
            entity = self.entities.get(topic if topic is not None else match["e"]) if match else None
            if entity is not None and attribute.name in entity.facts:
                return attribute.question.format(e=entity.name), match["v"], entity.facts[attribute.name]
        return None


# ---------------------------------------------------------------------------------------------------------------
# Paper scale: a local Wikipedia dump and the OpenAI API

PASSAGE_SEPARATOR = "####SPECIAL####SEPARATOR####"  # how FActScore's enwiki-20230401.db joins a page's passages


class LocalWikipedia:
    """Pages from a sqlite file in FActScore's schema: table `documents(title, text)`, each page's passages joined
    by PASSAGE_SEPARATOR."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"Wikipedia dump {self.path} not found; pass the path of FActScore's "
                             f"enwiki-20230401.db (or a sqlite file with a documents(title, text) table)")
        self.connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)

    def passages(self, title: str) -> list[str]:
        row = self.connection.execute("SELECT text FROM documents WHERE title = ?", (title,)).fetchone()
        if row is None:
            return []
        return [p.strip() for p in row[0].split(PASSAGE_SEPARATOR) if p.strip()]

    def has(self, title: str) -> bool:
        return bool(self.passages(title))


def bm25_top(query: str, passages: Sequence[str], k: int, k1: float = 1.5, b: float = 0.75) -> list[str]:
    """The k passages that best match `query` by BM25 over lower-cased words, in their page order when tied."""
    docs = [re.findall(r"\w+", p.lower()) for p in passages]
    if not docs:
        return []
    avg = sum(map(len, docs)) / len(docs)
    df = Counter(w for d in docs for w in set(d))
    terms = re.findall(r"\w+", query.lower())

    def score(doc):
        tf = Counter(doc)
        return sum(math.log(1 + (len(docs) - df[w] + 0.5) / (df[w] + 0.5)) * tf[w] * (k1 + 1)
                   / (tf[w] + k1 * (1 - b + b * len(doc) / avg)) for w in terms if tf[w])

    order = sorted(range(len(docs)), key=lambda i: (-score(docs[i]), i))
    return [passages[i] for i in order[:k]]


def split_sentences(text: str) -> list[str]:
    """Sentences on ". ", "! ", "? " boundaries (enough for one-paragraph responses)."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


ATOMIC_FACTS_PROMPT = ("Split the sentence below into short, self-contained facts, one per line, each line starting "
                       "with \"- \". Keep each fact as close to the sentence's wording as possible.\n\n"
                       "Sentence: {sentence}\nFacts:")
JUDGE_PROMPT = ("Use only the passages below about {topic} to decide whether the statement is true.\n\n"
                "{passages}\n\nStatement: {fact}\nIs the statement true? Answer True or False.\nAnswer:")


def parse_atomic_facts(reply: str) -> list[str]:
    return [line[2:].strip() for line in reply.splitlines() if line.startswith("- ") and line[2:].strip()]


def parse_judgement(reply: str) -> bool:
    """True iff the first of the words true / false in the reply is "true" (no verdict counts as unsupported)."""
    match = re.search(r"\b(true|false)\b", reply.lower())
    return bool(match) and match.group(1) == "true"


@dataclass(frozen=True)
class OpenAISettings:
    model: str = "gpt-3.5-turbo"
    temperature: float = 0.0
    max_tokens: int = 256
    n_passages: int = 5  # FActScore retrieves 5 passages per fact
    max_retries: int = 6  # the client's own retries, exponential backoff honouring retry-after
    timeout_s: float = 60.0
    workers: int = 8  # concurrent calls in `label_all`


class OpenAIFactChecker:
    """FActScore's two steps through the OpenAI chat-completions API. The key comes from OPENAI_API_KEY (or the
    client passed in) and never enters a log, an error message or the cache."""

    def __init__(self, passages: LocalWikipedia, settings: OpenAISettings = OpenAISettings(), client=None,
                 cache_dir: Path | None = None):
        self.passages, self.settings, self.workers = passages, settings, settings.workers
        self.client = client or self._client(settings)
        self.cache_dir = cache_dir or cache.cache_root() / "openai"
        # what the labels depend on, for the caches of everything computed from them
        self.key = cache.config_hash("openai", settings.model, settings.temperature, settings.max_tokens,
                                     settings.n_passages, ATOMIC_FACTS_PROMPT, JUDGE_PROMPT, str(passages.path))

    @staticmethod
    def _client(settings: OpenAISettings):
        import openai

        if not os.environ.get("OPENAI_API_KEY"):
            raise UsageError("OPENAI_API_KEY is not set; the paper-scale fact labeller calls the OpenAI API "
                             "(OPENAI_BASE_URL points it at another server speaking the same protocol)")
        return openai.OpenAI(max_retries=settings.max_retries, timeout=settings.timeout_s)

    def complete(self, prompt: str) -> str:
        """The model's reply to one user message, from the disk cache when this exact call was made before."""
        s = self.settings
        request = {"model": s.model, "temperature": s.temperature, "max_tokens": s.max_tokens, "prompt": prompt}
        path = self.cache_dir / s.model / f"{cache.config_hash(request, length=64)}.json"
        if path.exists():
            return json.loads(path.read_text())["reply"]
        reply = self._call(prompt)
        results.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(request | {"reply": reply})))
        return reply

    def _call(self, prompt: str) -> str:
        import openai

        s = self.settings
        try:
            response = self.client.chat.completions.create(
                model=s.model, messages=[{"role": "user", "content": prompt}], temperature=s.temperature,
                max_tokens=s.max_tokens)
        except openai.AuthenticationError:
            raise UsageError("the OpenAI API rejected the key (401); check OPENAI_API_KEY") from None
        except openai.APIStatusError as exc:
            raise UsageError(f"the OpenAI API refused a call to {s.model} ({exc.status_code}): "
                             f"{_redact(exc.message)}") from None
        except openai.APIConnectionError as exc:
            raise UsageError(f"could not reach the OpenAI API after {s.max_retries} retries: "
                             f"{type(exc).__name__}") from None
        return response.choices[0].message.content or ""

    def label(self, topic: str, text: str) -> list[Fact] | None:
        page = self.passages.passages(topic)
        if not page:
            return None
        facts = [f for sentence in split_sentences(text)
                 for f in parse_atomic_facts(self.complete(ATOMIC_FACTS_PROMPT.format(sentence=sentence)))]
        labelled = []
        for fact in facts:
            context = "\n\n".join(f"Title: {topic}\nText: {p}"
                                  for p in bm25_top(fact, page, self.settings.n_passages))
            reply = self.complete(JUDGE_PROMPT.format(topic=topic, passages=context, fact=fact))
            labelled.append(Fact(fact, parse_judgement(reply)))
        return labelled


def _redact(message: str) -> str:
    """One line, with anything shaped like an API key masked."""
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        message = message.replace(key, "***")
    return re.sub(r"sk-[A-Za-z0-9_\-]{8,}", "sk-***", " ".join(message.split()))
