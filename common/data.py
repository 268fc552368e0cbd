"""Paper-scale dataset loaders (SPEC.md sections 1-3), returning the task records of `common.tasks`.

`source` is a Hugging Face dataset id, or a local folder holding one `<split>.jsonl` per split in the dataset's
own schema (what the tests use, and a way to run offline). Nothing here downloads anything unless asked to
load a Hub id.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from common import tasks
from common.scales import UsageError

MMLU_SOURCES = ("cais/mmlu", "tasksource/mmlu")
MMLU_SPLITS = {"finetune": "test", "eval": "validation", "fewshot": "dev"}  # SPEC.md 1.1
TRIVIAQA_SOURCE = "mandarjoshi/trivia_qa"
TRIVIAQA_CONFIG = "rc.nocontext"
TRIVIAQA_SPLITS = {"finetune": "train", "eval": "validation"}  # SPEC.md section 3


def load_split(source: str, config: str | None, split: str):
    """One split as a `datasets.Dataset`, from a local `<split>.jsonl` folder or the Hub."""
    import datasets

    local = Path(source)
    try:
        if local.is_dir():
            path = local / f"{split}.jsonl"
            if not path.exists():
                raise UsageError(f"dataset folder {local} has no {split}.jsonl")
            return datasets.load_dataset("json", data_files={split: str(path)}, split=split)
        return datasets.load_dataset(source, config, split=split)
    except UsageError:
        raise
    except Exception as exc:  # the datasets library raises many types for "cannot fetch"
        raise UsageError(
            f"could not load dataset {source!r} (config {config!r}, split {split!r}): {type(exc).__name__}; "
            f"check the id and your network or HF_DATASETS_OFFLINE, or pass a folder of <split>.jsonl files") from None


def mmlu_records(rows: Iterable[dict], subject: str | None = None) -> list[tasks.MCQuestion]:
    """cais/mmlu rows: question, subject, choices (4 strings), answer (int 0-3). tasksource/mmlu configs lack
    `subject` (one config per subject), so it can be passed in."""
    out = []
    for row in rows:
        answer = row["answer"]
        if isinstance(answer, str):  # some mirrors store the letter
            answer = tasks.LETTERS.index(answer.strip())
        choices = tuple(row["choices"])
        if len(choices) != 4 or not 0 <= int(answer) < 4:
            raise ValueError(f"malformed MMLU row: {row!r}")
        out.append(tasks.MCQuestion(question=row["question"], subject=row.get("subject") or subject or "",
                                    choices=choices, answer=int(answer)))
    return out


def load_mmlu(source: str = "cais/mmlu", config: str = "all") -> dict[str, list[tasks.MCQuestion]]:
    """{"finetune": test, "eval": validation, "fewshot": dev} as MCQuestion lists."""
    return {role: mmlu_records(load_split(source, config, split)) for role, split in MMLU_SPLITS.items()}


def fewshot_by_subject(dev: list[tasks.MCQuestion], k: int = 5) -> dict[str, list[tasks.MCQuestion]]:
    """The first k dev items of each subject, in dataset order (MMLU's dev split has exactly 5)."""
    out: dict[str, list[tasks.MCQuestion]] = {}
    for q in dev:
        if len(out.setdefault(q.subject, [])) < k:
            out[q.subject].append(q)
    return out


def triviaqa_records(rows: Iterable[dict]) -> list[tasks.QAQuestion]:
    """trivia_qa rows: question, question_id, answer {value, aliases, normalized_value, ...}."""
    out = []
    for row in rows:
        answer = row["answer"]
        out.append(tasks.QAQuestion(question=row["question"], question_id=row["question_id"],
                                    value=answer["value"], aliases=tuple(answer.get("aliases") or ())))
    return out


def load_triviaqa(source: str = TRIVIAQA_SOURCE, config: str = TRIVIAQA_CONFIG) -> dict[str, list[tasks.QAQuestion]]:
    """{"finetune": train, "eval": validation} as QAQuestion lists."""
    return {role: triviaqa_records(load_split(source, config, split)) for role, split in TRIVIAQA_SPLITS.items()}


# ---------------------------------------------------------------------------------------------------------------
# SimpleFact (SPEC.md 7.1): SimpleQA, PopQA, SelfAware and TriviaQA mixed evenly

SIMPLEFACT_SOURCES = {  # name -> (Hub id or local folder, config, split)
    "simpleqa": ("basicv8vc/SimpleQA", None, "test"),
    "popqa": ("akariasai/PopQA", None, "test"),
    "selfaware": ("selfaware", None, "train"),  # no Hub copy: a folder holding the authors' JSON as train.jsonl
    "triviaqa": (TRIVIAQA_SOURCE, TRIVIAQA_CONFIG, "train"),
}


def simplefact_records(name: str, rows: Iterable[dict]) -> list[tasks.QAQuestion]:
    """Each source's schema as QAQuestions. SimpleQA: problem, answer. PopQA: id, question, possible_answers (a
    JSON list in a string). SelfAware: question_id, question, answer (a list, or null), answerable; an
    unanswerable question gets an empty value (no response can be correct). TriviaQA: as `triviaqa_records`."""
    import json

    if name == "triviaqa":
        return triviaqa_records(rows)
    out = []
    for i, row in enumerate(rows):
        if name == "simpleqa":
            out.append(tasks.QAQuestion(row["problem"], f"simpleqa/{i}", row["answer"]))
        elif name == "popqa":
            answers = row["possible_answers"]
            answers = json.loads(answers) if isinstance(answers, str) else list(answers)
            out.append(tasks.QAQuestion(row["question"], f"popqa/{row['id']}", answers[0], tuple(answers[1:])))
        elif name == "selfaware":
            answers = list(row.get("answer") or []) if row.get("answerable", True) else []
            out.append(tasks.QAQuestion(row["question"], f"selfaware/{row['question_id']}",
                                        answers[0] if answers else "", tuple(answers[1:])))
        else:
            raise ValueError(f"unknown SimpleFact source {name!r}; expected one of {list(SIMPLEFACT_SOURCES)}")
    return out


def load_simplefact_mix(sources: dict[str, str] | None = None, per_source: int = 4000, eval_per_source: int = 15,
                        seed: int = 0) -> dict[str, list[tasks.QAQuestion]]:
    """{"finetune": ..., "eval": ...}: from each source (its Hub id or a local folder, `sources` overriding
    SIMPLEFACT_SOURCES' locations) `eval_per_source` held-out questions and the same number of training ones,
    `per_source` or what the smallest source has left, drawn at random (seeded), so the sources are mixed evenly."""
    import numpy as np

    rng = np.random.default_rng([seed, 70])
    records = {name: simplefact_records(name, load_split((sources or {}).get(name, source), config, split))
               for name, (source, config, split) in SIMPLEFACT_SOURCES.items()}
    n_train = min(per_source, *(len(r) - eval_per_source for r in records.values()))
    splits: dict[str, list[tasks.QAQuestion]] = {"finetune": [], "eval": []}
    for rows in records.values():
        order = rng.permutation(len(rows))
        splits["eval"] += [rows[i] for i in order[:eval_per_source]]
        splits["finetune"] += [rows[i] for i in order[eval_per_source : eval_per_source + n_train]]
    return splits


# ---------------------------------------------------------------------------------------------------------------
# Long-form (SPEC.md 6.1): WikiBios names and WikiPlots titles, references from a local Wikipedia dump

WIKIBIO_SOURCE = "wiki_bio"
WIKIBIO_SPLITS = ("train", "val", "test")
ABBREVIATIONS = {"st", "dr", "jr", "sr", "mr", "mrs", "ms", "no", "vs", "mt", "ft", "gen", "col", "lt", "sgt", "rev"}


def first_sentence(text: str) -> str:
    """The first sentence, extended past a period that ends an initial or an abbreviation ("John F. Kennedy",
    "St. Louis", "U.S.")."""
    for match in re.finditer(r"\.(\s+|$)", text):
        word = text[: match.start()].rsplit(None, 1)[-1] if text[: match.start()].strip() else ""
        last = word.split(".")[-1].lower()
        if match.end() < len(text) and (len(last) == 1 or last in ABBREVIATIONS):
            continue
        return text[: match.start() + 1].strip()
    return text.strip()


def wikibio_name(context: str) -> str:
    """wiki_bio's `context` field ("walter extra -lrb- footballer -rrb-\\n") as a page title: parentheses restored,
    the name title-cased, the parenthetical lower-cased (SPEC.md 6.1)."""
    text = " ".join(context.replace("-lrb-", "(").replace("-rrb-", ")").split())
    text = text.replace("( ", "(").replace(" )", ")")
    name, paren, rest = text.partition("(")
    return name.strip().title() + (f" ({rest.strip().lower()}" if paren else "")


def drop_leading_parenthetical(sentence: str, name: str) -> str:
    """'Ada Lovelace (1815-1852) was ...' -> 'Ada Lovelace was ...' (test bios, SPEC.md 6.1)."""
    return re.sub(rf"^({re.escape(name)})\s*\([^()]*\)", r"\1", sentence)


def split_longform(items: list, n_eval: int, n_finetune: int | None, seed: int) -> dict[str, list]:
    """A seeded shuffle: the first `n_eval` items evaluate, the next `n_finetune` (default: all the rest) finetune."""
    import numpy as np

    order = np.random.default_rng([seed, 60]).permutation(len(items))
    if len(items) <= n_eval:
        raise UsageError(f"only {len(items)} long-form items have a page in the Wikipedia dump; {n_eval} are held "
                         f"out for evaluation")
    rest = order[n_eval:] if n_finetune is None else order[n_eval : n_eval + n_finetune]
    return {"finetune": [items[i] for i in rest], "eval": [items[i] for i in order[:n_eval]]}


def load_wikibios(wikipedia, source: str = WIKIBIO_SOURCE, n_eval: int = 5000, seed: int = 0) -> dict[str, list]:
    """{"finetune", "eval"} LongformItems: wiki_bio's names (all three splits) that have a page in `wikipedia`
    (a `factscore.LocalWikipedia`), each with the first sentence of its page as the reference; evaluation
    references lose a parenthetical right after the name."""
    names = dict.fromkeys(wikibio_name(row["input_text"]["context"])
                          for split in WIKIBIO_SPLITS for row in load_split(source, None, split))
    items = [tasks.LongformItem("bio", name, first_sentence(page[0]))
             for name in names if (page := wikipedia.passages(name))]
    splits = split_longform(items, n_eval, None, seed)
    splits["eval"] = [tasks.LongformItem("bio", it.topic, drop_leading_parenthetical(it.reference, it.topic))
                      for it in splits["eval"]]
    return splits


def load_wikiplots(folder: str | Path, wikipedia, n_finetune: int = 10_000, n_eval: int = 4795,
                   seed: int = 0) -> dict[str, list]:
    """{"finetune", "eval"} LongformItems from markriedl/WikiPlots' `titles` (one per line) and `plots` (sentences
    one per line, plots separated by "<EOS>" lines), kept where the title has a page in `wikipedia`; the reference
    is the plot's first sentence."""
    folder = Path(folder)
    for name in ("titles", "plots"):
        if not (folder / name).is_file():
            raise UsageError(f"WikiPlots folder {folder} has no `{name}` file (markriedl/WikiPlots' plots.zip)")
    titles = (folder / "titles").read_text(encoding="utf-8").splitlines()
    plots = [p.strip().splitlines() for p in (folder / "plots").read_text(encoding="utf-8").split("<EOS>")]
    plots = [p for p in plots if p]
    if len(plots) != len(titles):
        raise UsageError(f"WikiPlots folder {folder}: {len(titles)} titles but {len(plots)} plots")
    items = [tasks.LongformItem("plot", title, plot[0].strip())
             for title, plot in zip(titles, plots) if wikipedia.has(title)]
    return split_longform(items, n_eval, n_finetune, seed)
