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
