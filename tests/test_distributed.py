"""Two CPU processes through torchrun and accelerate (gloo) train the micro SFT, GRPO and PPO as one process does
with the same global batch, and only the main process writes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.rl import rollouts

ROOT = Path(__file__).resolve().parent.parent
TWO = ["torchrun", "--standalone", "--nproc_per_node", "2"]
needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None,
                                    reason="torchrun (torch's launcher) is not on PATH")


def launch(command, script, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*command, str(ROOT / "tests" / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@needs_torchrun
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    launch([sys.executable], "distributed_sft.py", tmp_path / "one")
    launch(TWO, "distributed_sft.py", tmp_path / "two")
    one = json.loads((tmp_path / "one" / "written_by_rank0.json").read_text())["losses"]
    two = json.loads((tmp_path / "two" / "written_by_rank0.json").read_text())["losses"]
    # each process's token mean over half the batch, all-reduced, equals the token mean over the whole batch
    # (every response has the same length); only float summation order differs
    assert two == pytest.approx(one, abs=1e-5) and len(two) == 4
    assert not (tmp_path / "two" / "written_by_rank1.json").exists()  # the second process wrote nothing
    for out in ("one", "two"):
        assert sorted(p.name for p in (tmp_path / out / "sft").iterdir()) == ["checkpoint-000002", "checkpoint-000004"]
    weights = [load_file(tmp_path / out / "sft" / "checkpoint-000004" / "weights" / "adapter_model.safetensors")
               for out in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert (weights[0][name] - weights[1][name]).abs().max() < 1e-5, name


@needs_torchrun
def test_grpo_minibatch_split_over_two_processes_updates_as_one_process(tmp_path):
    launch([sys.executable], "distributed_rl.py", "grpo_update", tmp_path / "one")
    launch(TWO, "distributed_rl.py", "grpo_update", tmp_path / "two")
    one, two = (load_file(tmp_path / out / "adapter" / "adapter_model.safetensors") for out in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:
        assert (one[name] - two[name]).abs().max() < 1e-5, name
    assert any(two[name].abs().max() > 0 for name in two if "lora_B" in name)  # the updates did move the adapter


@needs_torchrun
def test_ppo_minibatch_split_over_two_processes_updates_as_one_process(tmp_path):
    """Token means, whitening and the value loss cover both shares (the shares have different token counts)."""
    launch([sys.executable], "distributed_rl.py", "ppo_update", tmp_path / "one")
    launch(TWO, "distributed_rl.py", "ppo_update", tmp_path / "two")
    one, two = (load_file(tmp_path / out / "adapter" / "adapter_model.safetensors") for out in ("one", "two"))
    for name in one:
        assert (one[name] - two[name]).abs().max() < 1e-5, name
    assert any(two[name].abs().max() > 0 for name in two if "lora_B" in name)
    heads = [torch.load(tmp_path / out / "value_head.pt") for out in ("one", "two")]
    for name in heads[0]:
        assert (heads[0][name] - heads[1][name]).abs().max() < 1e-5, name


def per_rank_evidence(tmp_path):
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def assert_in_step_and_evaluated_once(ranks, evaluations):
    assert ranks[0]["digest"] == pytest.approx(ranks[1]["digest"], abs=1e-9)  # DDP kept the weights equal
    assert [h["step"] for h in ranks[0]["history"] if "evaluated_by" in h] == evaluations
    assert {h["evaluated_by"] for h in ranks[0]["history"] if "evaluated_by" in h} == {0}
    assert all("evaluated_by" not in h for h in ranks[1]["history"])


@needs_torchrun
def test_grpo_under_two_processes_scores_whole_groups_once_keeps_weights_in_step_and_writes_once(tmp_path):
    launch(TWO, "distributed_rl.py", "grpo_train", tmp_path)
    ranks = per_rank_evidence(tmp_path)
    order = rollouts.PromptOrder(8, [0, 61])
    for step in (0, 1):
        drawn = [order.next() for _ in range(4)]
        order.rng.permutation(4)  # the step's minibatch order, drawn from the same generator after the prompts
        mine = [[i for s, i in r["scored"] if s == step] for r in ranks]
        assert mine == [drawn[0::2], drawn[1::2]]  # every n-th prompt of the step, each group scored once
    assert_in_step_and_evaluated_once(ranks, [0, 1, 2])
    assert ranks[0]["history"][1]["reward"] == ranks[1]["history"][0]["reward"]  # means over both processes' groups
    assert sorted(p.name for p in (tmp_path / "grpo").iterdir()) == ["checkpoint-000001", "checkpoint-000002"]


@needs_torchrun
def test_grpo_sharded_over_two_processes_trains_as_ddp_writes_once_and_resumes_exactly(tmp_path):
    """FSDP2 (`GRPOConfig.shard`): the same samples, rewards and updates as DDP, each process holding half of every
    weight; both processes evaluate (every forward pass needs both) but the main process alone writes; a run
    stopped after one step and resumed by a fresh sharded policy ends where the uninterrupted one does."""
    launch(TWO, "distributed_rl.py", "grpo_train", tmp_path / "ddp")
    launch(TWO, "distributed_rl.py", "grpo_train_sharded", tmp_path / "fsdp")
    ddp, fsdp, resumed = (per_rank_evidence(tmp_path / out) for out in ("ddp", "fsdp", "fsdp/resumed"))
    assert [r["scored"] for r in fsdp] == [r["scored"] for r in ddp]  # the same prompts on the same processes
    for key in ("reward", "informative_groups", "response_tokens"):
        assert [h[key] for h in fsdp[0]["history"][1:]] == pytest.approx([h[key] for h in ddp[0]["history"][1:]])
    assert fsdp[0]["digest"] == pytest.approx(ddp[0]["digest"], abs=1e-5)
    assert fsdp[1]["digest"] == pytest.approx(fsdp[0]["digest"], abs=1e-9)  # gathered from the same shards
    assert {h["evaluated_by"] for r in fsdp for h in r["history"] if "evaluated_by" in h} == {0, 1}
    run = tmp_path / "fsdp" / "grpo"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-000001", "checkpoint-000002"]
    saved, written = (load_file(d / "checkpoint-000002" / "weights" / "adapter_model.safetensors")
                      for d in (tmp_path / "ddp" / "grpo", run))
    assert saved.keys() == written.keys()  # the whole adapter, under peft's names, as the unsharded run writes it
    for name in saved:
        assert (saved[name] - written[name]).abs().max() < 1e-5, name
    assert resumed[0]["digest"] == pytest.approx(fsdp[0]["digest"], abs=1e-6)
    assert [h["reward"] for h in resumed[0]["history"][1:]] == [h["reward"] for h in fsdp[0]["history"][1:]]


@needs_torchrun
def test_grpo_sharded_full_finetuning_with_a_sharded_reference_trains_as_ddp_and_resumes_exactly(tmp_path):
    """Round 2's shape (every weight trained, a frozen copy as the reference), sharded."""
    launch(TWO, "distributed_rl.py", "grpo_full", tmp_path)
    ddp, fsdp, resumed = (per_rank_evidence(tmp_path / out) for out in ("ddp", "fsdp", "fsdp/resumed"))
    assert [h["reward"] for h in fsdp[0]["history"][1:]] == pytest.approx([h["reward"] for h in ddp[0]["history"][1:]])
    assert [h["kl"] for h in fsdp[0]["history"][1:]] == pytest.approx([h["kl"] for h in ddp[0]["history"][1:]],
                                                                      abs=1e-6)
    # clipping covers the root's weights too (measured: taking them from model.parameters() after a no-grad
    # forward, which leaves the root gathered, clipped without them and moved the weights by 6e-3)
    assert fsdp[0]["digest"] == pytest.approx(ddp[0]["digest"], abs=1e-5)
    assert resumed[0]["digest"] == pytest.approx(fsdp[0]["digest"], abs=1e-6)
    saved, written = (load_file(tmp_path / d / "grpo" / "checkpoint-000002" / "weights" / "model.safetensors")
                      for d in ("ddp", "fsdp"))
    assert saved.keys() == written.keys()
    for name in saved:
        assert (saved[name] - written[name]).abs().max() < 1e-5, name


@needs_torchrun
def test_ppo_under_two_processes_collects_every_other_prompt_keeps_weights_in_step_and_writes_once(tmp_path):
    launch(TWO, "distributed_rl.py", "ppo_train", tmp_path)
    ranks = per_rank_evidence(tmp_path)
    order = rollouts.PromptOrder(8, [0, 31])
    for round_ in range(4):  # 4 rollouts a round, 2 per process, one step each
        drawn = [order.next() for _ in range(4)]
        order.rng.permutation(2)
        mine = [[i for r_, i in r["scored"] if r_ == round_] for r in ranks]
        assert mine == [drawn[0::2], drawn[1::2]]
    assert_in_step_and_evaluated_once(ranks, [0, 2, 4])
    assert ranks[0]["history"][1]["mean_score"] == ranks[1]["history"][0]["mean_score"]
    assert sorted(p.name for p in (tmp_path / "ppo").iterdir()) == ["checkpoint-000002", "checkpoint-000004"]
