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


# ---------------------------------------------------------------------------------------------------------------
# Sharding (FSDP2): a model too large to hold whole on every process, e.g. exp06's Qwen2.5-32B

def shard(model) -> None:
    """Shard `model` (a causal LM, or a peft model around one) over the processes with torch's FSDP2, in place:
    each decoder layer is one unit, the LM (embeddings, final norm, head) the root, so `generate`, which calls
    the LM's forward, gathers every layer as it goes. FSDP2 directly, not accelerate's FSDP plugin: accelerate
    ignores the plugin on CPU (measured: `Accelerator(cpu=True, fsdp_plugin=...)` wraps the model in DDP), and
    the tests run on CPU; the plugin calls the same `fully_shard`. Gradients are averaged over the processes, as
    DDP's are."""
    from torch.distributed.fsdp import fully_shard

    accelerator()  # the process group
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    units = tuple(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in units]
    if not layers:
        raise ValueError(f"cannot shard {type(lm).__name__}: it names no decoder layer class (_no_split_modules)")
    for layer in layers:
        fully_shard(layer)
    fully_shard(lm)


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local(value: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (DTensor) as the whole tensor, on every process; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def full_state(model, optimizer) -> dict:
    """The trained weights and the optimizer state of a sharded model, gathered whole onto the main process (the
    others get empty dicts): `save_checkpoint`'s `weights` and `optimizer_state`. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    return {"weights": weights, "optimizer_state": optimizer_state}


def _load_sharded(model, optimizer, weights: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Whole tensors (as `full_state` gathered them, read by every process) into a sharded model and optimizer.
    A peft adapter file names its tensors without the adapter's name ("lora_A.weight" for the model's
    "lora_A.default.weight")."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    adapter = model.active_adapter if hasattr(model, "get_base_model") else None
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    weights = {n: weights[n.replace(f".{adapter}.", ".") if adapter else n] for n in names}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True, strict=False))


def make_optimizer(params, cfg):
    """AdamW with a per-step CosineAnnealingLR (SPEC.md 0.3), from any config with lr, betas, eps, weight_decay,
    t_max and eta_min."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.t_max, eta_min=cfg.eta_min)
    return optimizer, scheduler


def check_finite(value: torch.Tensor, desc: str, step: int, last_good: Path | None, what: str = "loss") -> None:
    """Stop at a NaN or infinite loss (or gradient norm, before the optimizer steps on it), naming the step and the
    checkpoint to go back to."""
    value = local(value)
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
                    keep_last: int | None = None, weights: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write into a temp folder, then rename: a crash mid-save never leaves a checkpoint that looks complete.
    `modules` are extra trained parts saved beside the weights (PPO's value head); `loop_state` is whatever the
    training loop needs to continue exactly (its prompt order, its numpy generator); `keep_last` prunes older
    checkpoints (a fully finetuned 7B model with its optimizer state is about 45 GB each). A sharded model passes
    its gathered `weights` and `optimizer_state` (`full_state`)."""
    final = checkpoint_path(out_dir, step)
    tmp = Path(out_dir) / f".tmp-checkpoint-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / WEIGHTS, state_dict=weights)
    torch.save({"step": step, "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
                "scheduler": scheduler.state_dict(),
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


def saved_weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A checkpoint's trained weights and whether they are a peft adapter (else the whole model)."""
    from safetensors.torch import load_file

    adapter = Path(ckpt) / WEIGHTS / "adapter_model.safetensors"
    return load_file(adapter if adapter.exists() else Path(ckpt) / WEIGHTS / "model.safetensors"), adapter.exists()


def load_weights(model, ckpt: Path) -> None:
    """Put a checkpoint's trained weights (a peft adapter or the whole model) into an unsharded `model`."""
    weights, is_adapter = saved_weights(ckpt)
    if is_adapter:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
    else:
        model.load_state_dict(weights, strict=False)


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
    """Restore everything `save_checkpoint` wrote; returns (step, history, loop_state). Every process of a
    sharded model must call it."""
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    if is_sharded(model):
        _load_sharded(model, optimizer, saved_weights(ckpt)[0], state["optimizer"])
    else:
        load_weights(model, ckpt)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():  # rollouts sample on the GPU
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    for k, m in (modules or {}).items():
        m.load_state_dict(state["modules"][k])
    return state["step"], state["history"], state["loop_state"]
