"""Training machinery shared by SFT, reward models, PPO and GRPO: AdamW with a per-step cosine schedule (SPEC.md
0.3), atomic checkpoints that a resumed run continues exactly (weights, optimizer, schedule, the torch RNG and the
loop's own state such as its prompt order), the guard that stops a run at a non-finite loss, and the processes of
a multi-process run (accelerate: `accelerate launch` or `torchrun`; a plain `python` run is one process)."""
from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
WEIGHTS = "weights"  # a checkpoint's trained weights: a peft adapter, or the whole model when fully finetuned


@functools.lru_cache(maxsize=1)
def accelerator():
    """This process's `accelerate.Accelerator` (gloo on CPU, NCCL on GPUs when launched with several processes)."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """Only the main process writes files (caches, checkpoints, results); the others read what it wrote."""
    return accelerator().is_main_process


def sum_over_processes(value: torch.Tensor) -> torch.Tensor:
    """A detached tensor summed over the processes of a multi-process run (itself with one process), on its own
    device."""
    acc = accelerator()
    if acc.num_processes == 1:
        return value
    return acc.reduce(value.detach().to(acc.device), "sum").to(value.device)


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each statistic averaged over the processes of a multi-process run (as is with one process)."""
    acc = accelerator()
    if acc.num_processes == 1:
        return values
    means = acc.reduce(torch.tensor(list(values.values()), dtype=torch.float64, device=acc.device), "mean")
    return dict(zip(values, means.tolist()))


def make_optimizer(params, cfg):
    """AdamW with a per-step CosineAnnealingLR (SPEC.md 0.3), from any config with lr, betas, eps, weight_decay,
    t_max and eta_min."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.t_max, eta_min=cfg.eta_min)
    return optimizer, scheduler


def check_finite(value: torch.Tensor, desc: str, step: int, last_good: Path | None, what: str = "loss") -> None:
    """Stop at a NaN or infinite loss (or gradient norm, before the optimizer steps on it), naming the step and the
    checkpoint to go back to."""
    if not torch.isfinite(value):
        raise FloatingPointError(f"{desc}: {what} is {value.item()} at step {step}; "
                                 f"last good checkpoint: {last_good or 'none'}")


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[1])


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"checkpoint-{step:06d}"


def checkpoints(out_dir: Path) -> list[Path]:
    """The complete checkpoints in `out_dir`, oldest first."""
    return sorted(p for p in Path(out_dir).glob("checkpoint-*") if (p / "trainer_state.pt").exists())


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = checkpoints(out_dir)
    return done[-1] if done else None


def is_finished(out_dir: Path, cfg) -> bool:
    """Whether `out_dir` holds a checkpoint at or past `cfg.total_steps`."""
    ckpt = latest_checkpoint(out_dir)
    return ckpt is not None and step_of(ckpt) >= cfg.total_steps


def save_checkpoint(model, optimizer, scheduler, step: int, history: list[dict], out_dir: Path,
                    modules: dict[str, torch.nn.Module] | None = None, loop_state: Any = None,
                    keep_last: int | None = None) -> Path:
    """Write into a temp folder, then rename: a crash mid-save never leaves a checkpoint that looks complete.
    `modules` are extra trained parts saved beside the weights (PPO's value head); `loop_state` is whatever the
    training loop needs to continue exactly (its prompt order, its numpy generator); `keep_last` prunes older
    checkpoints (a fully finetuned 7B model with its optimizer state is about 45 GB each)."""
    final = checkpoint_path(out_dir, step)
    tmp = Path(out_dir) / f".tmp-checkpoint-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / WEIGHTS)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "history": history, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, "loop_state": loop_state,
                "modules": {k: m.state_dict() for k, m in (modules or {}).items()}}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep_last is not None:
        for old in checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def begin(model, optimizer, scheduler, out_dir: Path, cfg, resume: bool, desc: str,
          modules: dict[str, torch.nn.Module] | None = None, loop_state: Any = None
          ) -> tuple[int, list[dict], Any, Path | None]:
    """Where a training run starts: a finished run in `out_dir` is loaded (a cache hit), an unfinished one
    continues from its newest checkpoint only with `resume`, anything else starts afresh at step 0 with
    `loop_state`. Returns (step, history, loop_state, the last good checkpoint or None)."""
    last_good = latest_checkpoint(out_dir)
    if last_good is None or not (resume or is_finished(out_dir, cfg)):
        return 0, [], loop_state, None
    step, history, loop_state = load_checkpoint(model, optimizer, scheduler, last_good, modules)
    log.info("%s: %s %s (step %d)", desc, "loaded" if step >= cfg.total_steps else "resumed from", last_good, step)
    return step, history, loop_state, last_good


def load_weights(model, ckpt: Path) -> None:
    """Put a checkpoint's trained weights (a peft adapter or the whole model) into `model`."""
    from safetensors.torch import load_file

    adapter = Path(ckpt) / WEIGHTS / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
    else:
        model.load_state_dict(load_file(Path(ckpt) / WEIGHTS / "model.safetensors"), strict=False)


def uniform_step(losses: dict[str, dict[int, float]]) -> int:
    """The checkpoint rule for compared methods (SPEC.md section 8 [PROPOSED]): one step for all of them, the one
    whose validation loss averaged over the methods is lowest, among the steps every method saved (ties: the
    earliest)."""
    steps = sorted(set.intersection(*(set(per_step) for per_step in losses.values()))) if losses else []
    if not steps:
        raise ValueError("the compared methods share no checkpoint step")
    return min(steps, key=lambda s: sum(per_step[s] for per_step in losses.values()) / len(losses))


def load_checkpoint(model, optimizer, scheduler, ckpt: Path, modules: dict[str, torch.nn.Module] | None = None
                    ) -> tuple[int, list[dict], Any]:
    """Restore everything `save_checkpoint` wrote; returns (step, history, loop_state)."""
    load_weights(model, ckpt)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():  # rollouts sample on the GPU
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    for k, m in (modules or {}).items():
        m.load_state_dict(state["modules"][k])
    return state["step"], state["history"], state["loop_state"]
