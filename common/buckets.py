"""Bucketing by unfamiliarity score: fixed edges or quantiles, with counts always reported."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Bins:
    """Half-open bins [edges[i], edges[i+1]) unless `closed` says otherwise.

    closed = "left"  -> lo <= x <  hi   (SPEC.md Exp.4 NLL bins, TriviaQA #correct bins)
    closed = "open"  -> lo <  x <  hi   (SPEC.md Exp.1 NLL bins: strict at both ends)
    closed = "right" -> lo <  x <= hi
    Scores outside every bin get bin -1 and are not plotted.
    """

    edges: tuple[float, ...]
    closed: str = "left"

    def __post_init__(self):
        if len(self.edges) < 2 or any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError(f"bin edges must be strictly increasing, got {self.edges}")
        if self.closed not in ("left", "open", "right"):
            raise ValueError(f"closed must be left, open or right, got {self.closed!r}")

    @property
    def n(self) -> int:
        return len(self.edges) - 1

    def assign(self, scores: Sequence[float]) -> np.ndarray:
        x = np.asarray(scores, dtype=float)
        out = np.full(x.shape, -1, dtype=int)
        for i, (lo, hi) in enumerate(zip(self.edges, self.edges[1:])):
            if self.closed == "left":
                inside = (x >= lo) & (x < hi)
            elif self.closed == "open":
                inside = (x > lo) & (x < hi)
            else:
                inside = (x > lo) & (x <= hi)
            out[inside] = i
        return out

    def inclusive(self) -> "Bins":
        """The same bins with the lowest edge moved down to 0: the authors' TriviaQA bins start at 1 incorrect
        sample, dropping the questions answered right 12 times out of 12; this variant counts them in the most
        familiar bin (SPEC.md section 11). Bins that already start at 0 or below come back unchanged."""
        return self if self.edges[0] <= 0 else Bins((0,) + self.edges[1:], self.closed)

    def labels(self) -> list[str]:
        left, right = {"left": ("[", ")"), "open": ("(", ")"), "right": ("(", "]")}[self.closed]
        return [f"{left}{lo:g}, {hi:g}{right}" for lo, hi in zip(self.edges, self.edges[1:])]


def quantile_bins(scores: Sequence[float], n: int) -> Bins:
    """n bins holding about equal counts; the top edge is nudged up so the maximum falls inside."""
    x = np.asarray(scores, dtype=float)
    edges = np.unique(np.quantile(x, np.linspace(0, 1, n + 1)))
    edges[-1] = np.nextafter(edges[-1], np.inf)
    return Bins(tuple(float(e) for e in edges), closed="left")


def occupied(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a `summarize_by_bin` table that hold data: what is plotted and what claims read."""
    return table[table["count"] > 0]


def summarize_by_bin(frame: pd.DataFrame, score_col: str, bins: Bins, value_cols: Sequence[str]) -> pd.DataFrame:
    """Per bin: count, mean score (the plotted x), and mean and std of each value column.

    Every bin appears, empty ones with count 0 and NaN means, so a reader sees where data is missing.
    """
    which = bins.assign(frame[score_col].to_numpy())
    rows = []
    for i, label in enumerate(bins.labels()):
        part = frame[which == i]
        row = {"bin": i, "bin_label": label, "count": len(part),
               "x_mean": part[score_col].mean() if len(part) else np.nan}
        for col in value_cols:
            row[f"{col}_mean"] = part[col].mean() if len(part) else np.nan
            row[f"{col}_std"] = part[col].std(ddof=0) if len(part) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)
