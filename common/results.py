"""Everything a run writes: atomic files, CSVs, claims.json and manifest.json (DESIGN.md "What every run writes")."""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from common import training

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "numpy", "pandas",
            "matplotlib", "openai")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same folder, then rename, so a crash never leaves half a file. In a
    multi-process run only the main process writes."""
    if not training.is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n"))


def write_csv(path: Path, frame: pd.DataFrame, float_format: str | None = "%.6g") -> None:
    """Results are written to 6 significant digits; caches pass float_format=None to keep full precision."""
    atomic_write(path, lambda p: frame.to_csv(p, index=False, float_format=float_format))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@dataclass
class Claim:
    """One checkable statement of the paper, measured by a run: passes iff `value` `op` `threshold`."""

    id: str
    statement: str
    value: float
    threshold: float
    op: str  # ">=", "<=", ">" or "<"

    @property
    def passed(self) -> bool:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return False
        return {">=": self.value >= self.threshold, "<=": self.value <= self.threshold,
                ">": self.value > self.threshold, "<": self.value < self.threshold}[self.op]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "statement": self.statement, "value": _round(self.value),
                "threshold": self.threshold, "op": self.op, "passed": self.passed}


def _round(x: float) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(float(x), 4)


def claim(id: str, statement: str, value: float, op: str, threshold: float) -> Claim:
    if op not in (">=", "<=", ">", "<"):
        raise ValueError(f"claim {id}: op must be one of >=, <=, >, <; got {op!r}")
    return Claim(id=id, statement=statement, value=float(value), threshold=threshold, op=op)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass
class Run:
    """A run's output folder plus its manifest: stage timings, cache hits and everything needed to redo it."""

    out_dir: Path
    experiment: str
    scale: str
    preset: str
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    cache_hits: dict[str, bool] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    _start: float = field(default_factory=time.time)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.time()
        log.info("stage %s ...", name)
        try:
            yield
        finally:
            took = time.time() - t0
            self.timings[name] = round(took + self.timings.get(name, 0.0), 2)  # a repeated stage adds up
            log.info("stage %s done in %.1fs", name, took)

    def path(self, name: str) -> Path:
        return self.out_dir / name

    def write_csv(self, name: str, frame: pd.DataFrame) -> Path:
        write_csv(self.path(name), frame)
        return self.path(name)

    def write_claims(self, claims: list[Claim]) -> dict[str, Any]:
        payload = {"claims": [c.as_dict() for c in claims]}
        write_json(self.path("claims.json"), payload)
        for c in claims:
            log.info("claim %-45s %s  value=%s %s %s", c.id, "PASS" if c.passed else "FAIL", _round(c.value),
                     c.op, c.threshold)
        return payload

    def write_manifest(self) -> None:
        write_json(self.path("manifest.json"), {
            "experiment": self.experiment,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "scale": self.scale,
            "preset": self.preset,
            "seed": self.seed,
            "git_commit": git_commit(),
            "python": platform.python_version(),
            "packages": package_versions(),
            "config": self.config,
            "timings_s": self.timings,
            "total_s": round(time.time() - self._start, 2),
            "cache_hits": self.cache_hits,
            **self.extra,
        })


def claims_markdown(results_root: Path, scale: str = "synthetic") -> str:
    """The README's claims table: one row per claim id, one column per seed, read from every committed
    `<experiment>/<scale>/seed<N>/claims.json` under `results_root`."""
    files = sorted(results_root.glob(f"*/{scale}/seed*/claims.json"))
    seeds = sorted({int(f.parent.name.removeprefix("seed")) for f in files})
    rows: dict[str, dict] = {}
    for f in files:
        for c in json.loads(f.read_text())["claims"]:
            statement = f"{c['statement']} ({c['op']} {c['threshold']})".replace("|", "\\|")  # P(a | b) in a table
            row = rows.setdefault(c["id"], {"statement": statement})
            value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
            row[int(f.parent.name.removeprefix("seed"))] = f"{value} {'✅' if c['passed'] else '❌'}"
    lines = ["| claim | statement | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    lines += [f"| `{cid}` | {row['statement']} | " + " | ".join(row.get(s, "") for s in seeds) + " |"
              for cid, row in rows.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(claims_markdown(REPO_ROOT / "results", *sys.argv[1:]))
