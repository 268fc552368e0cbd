"""Supervised finetuning as the authors' trlx fork did it (SPEC.md 0.2, 0.3): (prompt, response) pairs tokenized
piecewise without BOS, " </s>" appended to the response, cross-entropy on response tokens only, AdamW
(0.9, 0.95, eps 1e-8, wd 1e-6) with CosineAnnealingLR stepped once per optimizer step.

Checkpoints, resume and the NaN guard are `common.training`'s: `resume=True` continues from the newest checkpoint.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from common import cache, models, training

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class SFTConfig:
    lr: float = 1e-5
    batch_size: int = 12
    total_steps: int = 2000
    t_max: int = 10_000
    eta_min: float = 1e-5  # == lr makes the cosine schedule constant, as in most of the authors' runs
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-6
    checkpoint_every: int = 500
    max_length: int = 1024
    log_every: int = 10


# The CPU scales' SFT settings, shared by the experiments (each paper-scale setting is its experiment's own):
# the tiny synthetic model needs a far larger learning rate than Llama-2-7B's 1e-5.
SYNTHETIC_SFT = SFTConfig(lr=2e-3, batch_size=16, total_steps=3000, t_max=3000, eta_min=2e-4, checkpoint_every=1000)
MICRO_SFT = SFTConfig(lr=1e-3, batch_size=4, total_steps=4, t_max=4, eta_min=1e-3, checkpoint_every=2)


def with_eos(response: str, eos: str = "</s>") -> str:
    """The fork's rule: append " </s>", or just "</s>" when the response already ends in a space."""
    if response.endswith(eos):
        return response
    return response + eos if response.endswith(" ") else f"{response} {eos}"


def encode_pair(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt+response and labels that are IGNORE_INDEX on the prompt (loss on the response only)."""
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    r = tokenizer(with_eos(response, tokenizer.eos_token), add_special_tokens=False).input_ids
    ids = (p + r)[:max_length]
    labels = ([IGNORE_INDEX] * len(p) + r)[:max_length]
    return ids, labels


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and of the loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not IGNORE_INDEX."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                             shift_labels.reshape(-1), ignore_index=IGNORE_INDEX)


def train_sft(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], cfg: SFTConfig, out_dir: Path,
              seed: int, resume: bool = False, desc: str = "sft",
              on_checkpoint: Callable[[int, Path], None] | None = None) -> pd.DataFrame:
    """Train the trainable (LoRA) parameters of `model` on the pairs; returns the loss history.

    If `out_dir` already holds the final checkpoint, it is loaded instead of training (callers key `out_dir` by
    everything the run depends on); an unfinished run there is continued when `resume` is set.

    The pairs are shuffled once with `seed` and then read in order, cycling (the fork's unshuffled loader over a
    once-shuffled list). Under several processes each takes every n-th example of the global batch
    `cfg.batch_size` and DDP averages the gradients; only the main process writes checkpoints.
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need equally many prompts and responses, got {len(prompts)} and {len(responses)}")
    out_dir = Path(out_dir)
    order = np.random.default_rng([seed, 21]).permutation(len(prompts))
    encoded = [encode_pair(tokenizer, prompts[i], responses[i], cfg.max_length) for i in order]
    optimizer, scheduler = training.make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    torch.manual_seed(seed)  # a loaded checkpoint restores the RNG it saved
    # A finished run in this folder is a cache hit; an unfinished one continues only when asked to.
    step, history, _, last_good = training.begin(model, optimizer, scheduler, out_dir, cfg, resume, desc)
    acc = training.accelerator()
    n_proc, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % n_proc:
        raise ValueError(f"batch size {cfg.batch_size} does not split over {n_proc} processes")
    ddp_model = acc.prepare_model(model) if n_proc > 1 else model
    device = next(model.parameters()).device
    model.train()
    bar = tqdm(total=cfg.total_steps, initial=step, desc=desc, disable=not acc.is_main_process)
    while step < cfg.total_steps:
        start = (step * cfg.batch_size) % len(encoded)
        batch_examples = [encoded[(start + j) % len(encoded)] for j in range(rank, cfg.batch_size, n_proc)]
        batch = {k: v.to(device) for k, v in collate(batch_examples, tokenizer.pad_token_id).items()}
        logits = ddp_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
        loss = response_loss(logits, batch["labels"])
        training.check_finite(loss, desc, step + 1, last_good)
        acc.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = acc.reduce(loss.detach(), "mean").item() if n_proc > 1 else loss.item()
        history.append({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0]})
        bar.update(1)
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{np.mean([h['loss'] for h in history[-cfg.log_every:]]):.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
            if acc.is_main_process:
                training.save_checkpoint(model, optimizer, scheduler, step, history, out_dir)
            acc.wait_for_everyone()
            last_good = training.checkpoint_path(out_dir, step)
            if on_checkpoint is not None:
                on_checkpoint(step, last_good)
    bar.close()
    model.eval()
    return pd.DataFrame(history)


@torch.no_grad()
def checkpoint_losses(model, tokenizer, out_dir: Path, prompts: Sequence[str], responses: Sequence[str],
                      batch_size: int = 32) -> dict[int, float]:
    """The response loss (token mean) on held-out pairs at every checkpoint in `out_dir`; `model` is left holding
    the last checkpoint's weights."""
    encoded = [encode_pair(tokenizer, p, r, 10**9) for p, r in zip(prompts, responses)]
    device = next(model.parameters()).device
    losses = {}
    model.eval()
    for ckpt in training.checkpoints(out_dir):
        training.load_weights(model, ckpt)
        total, count = 0.0, 0
        for i in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[i: i + batch_size], tokenizer.pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += response_loss(logits, batch["labels"]).item() * n
            count += n
        losses[training.step_of(ckpt)] = total / count
    return losses


# The checkpoint a figure reads (SPEC.md section 8): "authors" = the preset's final step (the paper presets' total
# steps are the authors' figure steps); "uniform" = one step for the compared methods, chosen on a validation split
# held out of the finetuning pool.
CHECKPOINT_RULES = ("authors", "uniform")
VALIDATION_FRACTION = 0.1


def validation_split(n: int, rule: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices of a finetuning pool of n questions: the uniform checkpoint rule holds
    VALIDATION_FRACTION out, the authors' rule trains on all of it."""
    if rule not in CHECKPOINT_RULES:
        raise ValueError(f"unknown checkpoint rule {rule!r}; expected one of {CHECKPOINT_RULES}")
    if rule == "authors":
        return np.arange(n), np.arange(0)
    order = np.random.default_rng([seed, 31]).permutation(n)
    cut = max(1, round(VALIDATION_FRACTION * n))
    return np.sort(order[cut:]), np.sort(order[:cut])


Pairs = tuple[list[str], list[str]]


def select_uniform_step(base, lora, cfg: SFTConfig, methods: dict[str, tuple[Pairs, Pairs]], run, seed: int,
                        resume: bool = False, table: str = "checkpoint_selection.csv") -> int:
    """Train (or load) every compared method, each {name: ((prompts, targets), (validation prompts, validation
    targets))}, score every checkpoint on its validation pairs, write the losses to `table` and return the step
    with the lowest mean loss (`training.uniform_step`)."""
    losses = {}
    for name, ((prompts, targets), validation) in methods.items():
        model = finetune_lora(base, lora, cfg, prompts, targets, name, run, seed=seed, resume=resume)
        with run.stage(f"validate_{name}"):
            out_dir = adapter_dir(base, lora, cfg, prompts, targets, seed)
            losses[name] = checkpoint_losses(model, base.tokenizer, out_dir, *validation)
        base.model = model.unload()
    step = training.uniform_step(losses)
    frame = pd.DataFrame(losses).rename_axis("step").reset_index()
    frame["chosen"] = frame.step == step
    run.write_csv(table, frame)
    return step


def adapter_dir(base, lora, cfg: SFTConfig, prompts: Sequence[str], responses: Sequence[str], seed: int) -> Path:
    """Where the adapter for these settings and pairs is cached; its name identifies the finetuned model."""
    return cache.cache_dir("sft", base.key, lora, cfg, seed, list(prompts), list(responses))


def finetune_lora(base, lora, cfg: SFTConfig, prompts: Sequence[str], responses: Sequence[str], name: str, run,
                  seed: int, resume: bool = False, at_step: int | None = None):
    """Add a fresh LoRA adapter to `base.model` and SFT it on the pairs, or load the finished adapter from the
    cache (keyed by the base model, every setting and every pair); `at_step` then puts an earlier checkpoint's
    weights in (the checkpoint rule). Returns the adapted model; call `.unload()` on it to get the untouched base
    back for the next variant. Its `adapter_key` (the cache folder's name) names the finetuned model in the keys of
    what is built on it."""
    model = models.add_lora(base.model, lora, seed=seed)
    out_dir = adapter_dir(base, lora, cfg, prompts, responses, seed)
    model.adapter_key = out_dir.name
    run.cache_hits[f"sft_{name}"] = training.is_finished(out_dir, cfg)
    with run.stage(f"sft_{name}"):
        history = train_sft(model, base.tokenizer, prompts, responses, cfg, out_dir, seed=seed, resume=resume,
                            desc=f"SFT {name}")
    run.write_csv(f"sft_{name}_history.csv", history)
    if at_step is not None and at_step != cfg.total_steps:
        ckpt = training.checkpoint_path(out_dir, at_step)
        if not ckpt.exists():
            raise SystemExit(f"error: SFT {name} saved no checkpoint at step {at_step} (every {cfg.checkpoint_every})")
        training.load_weights(model, ckpt)
    return model
