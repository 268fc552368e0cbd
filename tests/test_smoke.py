"""Subprocess smoke runs of every entry point at --preset micro (seconds each; no claim is expected to hold)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def run_module(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args, "--preset", "micro", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_world_entry_point_writes_familiarity(tmp_path):
    proc = run_module(["-m", "common.world", "--scale", "synthetic", "--seed", "0"], tmp_path)
    assert proc.stdout.splitlines()[0].startswith("scale: synthetic")
    table = pd.read_csv(tmp_path / "familiarity.csv")
    assert list(table.columns) == ["exposure_bin", "n_entities", "qa_accuracy", "mc_accuracy"]
    assert table.exposure_bin.iloc[0] == "0"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["cache_hits"] == {"world": False}
    assert {"build_or_load_world", "measure_familiarity"} <= set(manifest["timings_s"])
    assert (tmp_path / "familiarity.png").stat().st_size > 0
