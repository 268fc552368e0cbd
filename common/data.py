"""Paper-scale dataset loaders (SPEC.md sections 1-3), returning the task records of `common.tasks`.

`source` is a Hugging Face dataset id, or a local folder holding one `<split>.jsonl` per split in the dataset's
own schema (what the tests use, and a way to run offline). Nothing here downloads anything unless asked to
load a Hub id.
"""
from __future__ import annotations

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
