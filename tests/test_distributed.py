"""Two CPU processes through torchrun and accelerate (gloo) train the micro SFT as one process does with the same
global batch, and only the main process writes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "distributed_sft.py"


def launch(command, out):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*command, str(SCRIPT), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun (torch's launcher) is not on PATH")
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    launch([sys.executable], tmp_path / "one")
    launch(["torchrun", "--standalone", "--nproc_per_node", "2"], tmp_path / "two")
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
