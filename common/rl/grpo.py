"""GRPO as SPEC.md 7.4 reads the SimpleFact notes (in the style of the author's SimpleGRPO repo).

G responses per question are sampled together and scored together: the reward is a function of the whole group
(SimpleFact rewards abstaining only when no response of the group is correct), so this module owns the group and
calls `group_reward(rollout step, question index, the group's responses)` (the step lets a reward follow a
schedule). Each response's advantage is its reward minus its
group's mean (divided by the group's std behind a flag). The loss is the clipped surrogate on the sequence-level
ratio exp(sum log pi - sum log pi_old) over response tokens, plus a k3 estimate of the KL to the frozen starting
model on the same sequence log-ratio, optionally clamped ("KL clipping", SPEC.md 7.4's reading). The rollout batch
is split into minibatches, one optimizer step each, so later minibatches are slightly off-policy and the clip
matters; their old log-probs are recomputed by the policy right after sampling, while the first minibatch, still
on-policy, takes its own forward pass's (detached), so its ratio is exactly 1 and one scoring pass is saved.
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

from common import training
from common.rl import rollouts

log = logging.getLogger(__name__)
GroupReward = Callable[[int, int, Sequence[str]], Sequence[float]]  # (step, question index, responses) -> rewards


@dataclass(frozen=True)
class GRPOConfig:
    lr: float = 1e-5
    t_max: int = 1000  # optimizer steps ([PROPOSED] in SPEC.md 7.4: SimpleGRPO counted rollout steps)
    eta_min: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01  # torch's AdamW default, which SimpleGRPO kept
    total_steps: int = 100  # rollout steps: sample, score, then one optimizer step per minibatch
    prompts_per_step: int = 16
    group_size: int = 20
    minibatch_size: int = 8  # responses per optimizer step
    clip_eps: float = 0.05
    kl_coef: float = 1.0
    kl_clamp: float | None = None  # clamp each response's k3 estimate to [-kl_clamp, kl_clamp]
    std_normalize: bool = False
    max_grad_norm: float = 1.0
    max_new_tokens: int = 256
    temperature: float = 1.0
    sample_batch_size: int = 16  # prompts per generate call
    cache: str = "dynamic"  # the KV cache while sampling (sampling.SamplingConfig.cache)
    checkpoint_every: int = 50  # rollout steps
    eval_every: int = 20
    keep_checkpoints: int | None = None  # prune all but the last N (a fully finetuned 7B model's are ~45 GB)
    shard: bool = False  # under several processes, FSDP2 instead of DDP: each holds 1/n of the weights (32B)


# ---------------------------------------------------------------------------------------------------------------
# The pieces, on per-response tensors

def group_advantages(rewards: torch.Tensor, std_normalize: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """[questions, G] rewards -> advantages: minus the group mean, and with `std_normalize` over the group's
    (population) std plus eps."""
    advantages = rewards - rewards.mean(-1, keepdim=True)
    if std_normalize:
        advantages = advantages / (rewards.std(-1, unbiased=False, keepdim=True) + eps)
    return advantages


def k3_kl(ref_logprob: torch.Tensor, logprob: torch.Tensor, clamp: float | None = None) -> torch.Tensor:
    """exp(d) - d - 1 with d = log pi_ref - log pi (per response, summed over its tokens): a non-negative,
    unbiased estimate of KL(pi || pi_ref) under samples from pi."""
    d = ref_logprob - logprob
    if clamp is not None:  # exp(d) of a far-drifted sequence is inf, and its gradient through the clamp NaN
        d = d.clamp(max=float(np.log1p(clamp)) + 1.0)  # k3 there is still above the clamp
    kl = torch.exp(d) - d - 1
    return kl.clamp(-clamp, clamp) if clamp is not None else kl


def grpo_loss(logprob: torch.Tensor, old_logprob: torch.Tensor, ref_logprob: torch.Tensor | None,
              advantages: torch.Tensor, clip_eps: float, kl_coef: float, kl_clamp: float | None = None
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over responses of -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * k3; the ratio is
    exp(logprob - old_logprob) on sequence log-probs."""
    ratio = torch.exp(logprob - old_logprob)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    surrogate = -torch.min(unclipped, clipped)
    kl = k3_kl(ref_logprob, logprob, kl_clamp) if ref_logprob is not None else torch.zeros_like(logprob)
    loss = (surrogate + kl_coef * kl).mean()
    return loss, {"loss": loss.item(), "kl": kl.mean().item(), "ratio": ratio.mean().item(),
                  "clipfrac": (clipped < unclipped).float().mean().item()}  # where the min takes the clip


def sequence_logprobs(model, batch_rollouts: Sequence[rollouts.Rollout], pad_id: int) -> torch.Tensor:
    batch = rollouts.collate(batch_rollouts, pad_id)
    return rollouts.token_logprobs(rollouts.response_logits(model, batch), batch).sum(-1)


@torch.no_grad()
def scored_logprobs(model, flat: Sequence[rollouts.Rollout], pad_id: int, minibatch: int) -> torch.Tensor:
    return torch.cat([sequence_logprobs(model, flat[i : i + minibatch], pad_id)
                      for i in range(0, len(flat), minibatch)])


# ---------------------------------------------------------------------------------------------------------------
# Training

def minibatch_updates(model, optimizer, scheduler, flat: Sequence[rollouts.Rollout], old: torch.Tensor,
                      ref: torch.Tensor | None, advantages: torch.Tensor, permutation: np.ndarray, minibatch: int,
                      cfg: GRPOConfig, pad_id: int, desc: str, step: int, last_good: Path | None) -> list[dict]:
    """One optimizer step per `minibatch` rollouts of `flat` in `permutation` order; `old` is read from the second
    minibatch on (the first is on-policy: its old log-probs are its own, detached). `model` is the policy, or
    its DDP wrapper in a multi-process run: each process then holds its share of every minibatch and the
    gradients are averaged, which is the whole minibatch's mean loss when the shares are equal."""
    # The optimizer's own parameters: a sharded model's root keeps its gathered (unsharded) weights between a
    # no-grad forward and the next backward, so model.parameters() would miss the shards the gradients land on.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stats = []
    for start in range(0, len(flat), minibatch):
        mb = permutation[start : start + minibatch]
        logprob = sequence_logprobs(model, [flat[i] for i in mb], pad_id)
        loss, s = grpo_loss(logprob, logprob.detach() if start == 0 else old[mb], None if ref is None else ref[mb],
                            advantages[mb], cfg.clip_eps, cfg.kl_coef, cfg.kl_clamp)
        training.check_finite(loss, desc, step, last_good)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        training.check_finite(norm, desc, step, last_good, "gradient norm")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stats.append(s)
    return stats


def train_grpo(policy, tokenizer, prompts: Sequence[str], group_reward: GroupReward, cfg: GRPOConfig,
               out_dir: Path, seed: int, resume: bool = False, evaluate: Callable[[int], dict] | None = None,
               reference=None, desc: str = "grpo") -> pd.DataFrame:
    """GRPO on `policy`'s trainable parameters: a peft model (its reference is the model with the adapter
    disabled) or a fully trainable model with a frozen copy of its start as `reference`. Returns one row per
    rollout step (reward, the share of groups whose rewards differ, KL, clip fraction, ...; `evaluate(step)` adds
    columns at step 0 and every `eval_every` steps). A finished run in `out_dir` is loaded instead of retrained;
    an unfinished one continues exactly, same prompt order and random streams, with `resume`.

    Under several processes (accelerate) every process draws the same prompts and keeps every n-th one, whole
    groups: it samples, scores and computes advantages for its own groups and holds 1/n of every minibatch, DDP
    averages the gradients, and the history's statistics are means over all groups. Only the main process
    evaluates and writes checkpoints. With `cfg.shard` the policy (and `reference`) are sharded in place with
    FSDP2 instead (`training.shard`): every forward pass then involves every process, so all of them sample in
    step (`synced_gpus`), evaluate and gather the checkpoint, and only the main process keeps and writes them."""
    out_dir = Path(out_dir)
    acc = training.accelerator()
    n_proc = acc.num_processes
    if cfg.prompts_per_step % n_proc or cfg.minibatch_size % n_proc:
        raise ValueError(f"prompts_per_step {cfg.prompts_per_step} and minibatch_size {cfg.minibatch_size} must "
                         f"split over {n_proc} processes")
    sharded = cfg.shard and n_proc > 1
    if sharded:
        for m in (policy, reference):
            if m is not None:
                training.shard(m)
    optimizer, scheduler = training.make_optimizer([p for p in policy.parameters() if p.requires_grad], cfg)
    torch.manual_seed(seed)  # a loaded checkpoint restores the RNG it saved
    step, history, loop, last_good = training.begin(policy, optimizer, scheduler, out_dir, cfg, resume, desc)
    order = rollouts.PromptOrder(len(prompts), [seed, 61], loop)
    model = acc.prepare_model(policy) if n_proc > 1 and not sharded else policy
    pad = tokenizer.pad_token_id
    evaluates = acc.is_main_process or sharded

    if evaluate is not None and step == 0 and evaluates:
        history.append({"step": 0, **evaluate(0)})
    bar = tqdm(total=cfg.total_steps, initial=step, desc=desc, disable=not acc.is_main_process)
    while step < cfg.total_steps:
        idx = rollouts.process_share([order.next() for _ in range(cfg.prompts_per_step)])
        policy.eval()
        groups = rollouts.sample(policy, tokenizer, [prompts[i] for i in idx], cfg.group_size, cfg.max_new_tokens,
                                 cfg.temperature, cfg.sample_batch_size, desc=f"{desc}: sample",
                                 generator_seed=rollouts.process_stream(seed, step), cache=cfg.cache)
        rewards = torch.tensor([list(group_reward(step, i, [tokenizer.decode(r.response_ids) for r in group]))
                                for i, group in zip(idx, groups)], dtype=torch.float32)
        advantages = group_advantages(rewards, cfg.std_normalize).flatten()
        flat = [r for group in groups for r in group]
        permutation = order.rng.permutation(len(flat))
        minibatch = cfg.minibatch_size // n_proc
        old = torch.full((len(flat),), float("nan"))  # the first minibatch's stay unread
        later = permutation[minibatch:]
        if len(later):
            old[later] = scored_logprobs(policy, [flat[i] for i in later], pad, cfg.minibatch_size)
        ref = None
        if cfg.kl_coef:
            if reference is None:
                with policy.disable_adapter():
                    ref = scored_logprobs(policy, flat, pad, cfg.minibatch_size)
            else:
                ref = scored_logprobs(reference, flat, pad, cfg.minibatch_size)

        policy.train()
        stats = minibatch_updates(model, optimizer, scheduler, flat, old, ref, advantages, permutation, minibatch,
                                  cfg, pad, desc, step + 1, last_good)
        step += 1
        every = acc.gather(rewards) if n_proc > 1 else rewards
        means = training.mean_over_processes(
            {"response_tokens": float(np.mean([len(r.response_ids) for r in flat])),
             **{k: float(np.mean([s[k] for s in stats])) for k in stats[0]}})
        row = {"step": step, "reward": every.mean().item(),
               "informative_groups": (every.std(-1) > 0).float().mean().item(), **means,
               "lr": scheduler.get_last_lr()[0]}
        if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.total_steps) and evaluates:
            policy.eval()
            row.update(evaluate(step))
        history.append(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.2f}", kl=f"{row['kl']:.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
            state = training.full_state(policy, optimizer) if sharded else {}
            if acc.is_main_process:
                training.save_checkpoint(policy, optimizer, scheduler, step, history, out_dir,
                                         loop_state=order.state(), keep_last=cfg.keep_checkpoints, **state)
            acc.wait_for_everyone()
            last_good = training.checkpoint_path(out_dir, step)
    bar.close()
    policy.eval()
    return pd.DataFrame(history)
