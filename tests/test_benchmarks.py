import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_paper_budget_hours_by_hand_and_one_row_per_stage():
    budget = load("paper_budget")
    n = budget.N_PARAMS
    training = budget.Stage("f", "w", train_steps=10, batch=2, tokens=100)  # 2,000 trained tokens, 4N FLOPs each
    assert training.hours == pytest.approx(4 * n * 2000 / (989e12 * 0.35) / 3600)
    # 128 samples of 10 new tokens in batches of 64: 20 decoding steps, each one read of 2N bytes at half of
    # 3.35 TB/s, plus the 128 prompts' forward passes of 5 tokens
    sampling = budget.Stage("f", "w", samples=128, new_tokens=10, tokens=5, decode_batch=64)
    assert sampling.hours == pytest.approx((20 * 2 * n / (3.35e12 * 0.5) + 2 * n * 640 / (989e12 * 0.35)) / 3600)
    # every weight trained (exp06 round 2): 6N FLOPs per token, N of the stage's own model
    full = budget.Stage("f", "w", train_steps=10, batch=2, tokens=100, n_params=7.62e9, full_finetune=True)
    assert full.hours == pytest.approx(6 * 7.62e9 * 2000 / (989e12 * 0.35) / 3600)
    table = budget.table().splitlines()
    assert len(table) == 2 + len(budget.stages()) + 1 and table[-1].startswith("| **all**")
    # GRPO round 1: 1,200 steps x 16 prompts x G = 20 rollouts, one optimizer step per minibatch of 8
    (round1,) = [s for s in budget.stages() if "round 1" in s.what]
    assert (round1.train_steps, round1.batch, round1.n_params) == (48_000, 8, 32.5e9)
