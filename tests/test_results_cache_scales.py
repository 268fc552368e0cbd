import json
from dataclasses import dataclass

import pandas as pd
import pytest

from common import cache, results, scales


@dataclass(frozen=True)
class Cfg:
    a: int = 1
    b: tuple = (1, 2)


def test_config_hash_is_stable_and_sensitive():
    assert cache.config_hash({"x": 1, "y": 2}) == cache.config_hash({"y": 2, "x": 1})
    assert cache.config_hash(Cfg()) == cache.config_hash(Cfg(a=1, b=(1, 2)))
    assert cache.config_hash(Cfg()) != cache.config_hash(Cfg(a=2))
    assert cache.config_hash(Cfg(), 0) != cache.config_hash(Cfg(), 1)


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    assert cache.cache_dir("world", Cfg()).parent == tmp_path / "world"


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "x.json"
    results.write_json(target, {"v": 1})

    def explode(p):
        p.write_text("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        results.atomic_write(target, explode)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


@pytest.mark.parametrize("value, op, threshold, passed", [
    (0.7, ">=", 0.7, True), (0.69, ">=", 0.7, False), (0.1, "<=", 0.1, True), (0.11, "<=", 0.1, False),
    (float("nan"), ">=", 0.0, False), (0.0, ">", 0.0, False), (0.01, ">", 0.0, True), (0.0, "<", 0.0, False),
])
def test_claim_verdicts(value, op, threshold, passed):
    assert results.claim("c", "s", value, op, threshold).passed is passed


def test_claim_rejects_unknown_operator():
    with pytest.raises(ValueError):
        results.claim("c", "s", 1.0, "=>", 0.5)


def test_run_writes_claims_and_manifest(tmp_path):
    run = results.Run(tmp_path, "exp", "synthetic", "default", 3, config={"lr": 1e-5})
    with run.stage("train"):
        pass
    run.write_csv("panel.csv", pd.DataFrame({"x": [1.0 / 3]}))
    payload = run.write_claims([results.claim("a.b", "holds", 0.8, ">=", 0.7)])
    run.write_manifest()
    assert payload == {"claims": [{"id": "a.b", "statement": "holds", "value": 0.8, "threshold": 0.7, "op": ">=",
                                   "passed": True}]}
    assert json.loads((tmp_path / "claims.json").read_text()) == payload
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == 3 and "train" in manifest["timings_s"] and manifest["packages"]["torch"]
    assert (tmp_path / "panel.csv").read_text() == "x\n0.333333\n"


def test_auto_scale_follows_cuda(monkeypatch):
    monkeypatch.setattr(scales, "cuda_available", lambda: True)
    assert scales.resolve_scale("auto") == ("paper", "auto: CUDA is available")
    monkeypatch.setattr(scales, "cuda_available", lambda: False)
    assert scales.resolve_scale("auto") == ("synthetic", "auto: no CUDA")
    assert scales.resolve_scale("paper") == ("paper", "requested")


def test_scale_errors_are_one_line():
    with pytest.raises(SystemExit, match="unknown scale 'huge'"):
        scales.resolve_scale("huge")
    with pytest.raises(SystemExit, match="not built yet"):
        scales.resolve_scale("small")


def test_parse_run_args_prints_scale_first_and_picks_out_dir(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    scales.add_common_args(parser)
    _, run = scales.parse_run_args("exp01", parser, ["--scale", "synthetic", "--seed", "2", "--preset", "micro"])
    assert capsys.readouterr().out.splitlines()[0] == "scale: synthetic (requested); preset: micro; seed: 2"
    assert run.out.parts[-3:] == ("exp01", "synthetic-micro", "seed2")


def test_claims_markdown_has_one_row_per_claim_and_one_column_per_seed(tmp_path):
    for seed, value in ((0, 0.5), (1, 0.2)):
        results.write_json(tmp_path / "expX" / "synthetic" / f"seed{seed}" / "claims.json", {"claims": [
            results.claim("fig.x", "P(x | y) rises", value, ">=", 0.4).as_dict()]})
    results.write_json(tmp_path / "expX" / "paper" / "seed0" / "claims.json", {"claims": []})
    assert results.claims_markdown(tmp_path).splitlines() == [
        "| claim | statement | seed 0 | seed 1 |",
        "|---|---|---|---|",
        "| `fig.x` | P(x \\| y) rises (>= 0.4) | 0.500 ✅ | 0.200 ❌ |",  # a bare | would split the cell
    ]
