"""PPO as the authors configured trlx (SPEC.md 0.4): LoRA policy with a value head on the detached last hidden
state, reference = the same network with the adapter disabled, the scalar reward at the last response token plus a
per-token KL penalty, GAE, per-minibatch whitened advantages, clipped surrogate, value-only warm-up.

`replicate_kl0_quirk` reproduces the fork's behaviour at KL coefficient 0 (SPEC.md section 9 item 5): the old and
reference log-probs are the constant 1.0, so the ratio is exp(log pi - 1) < 1 - cliprange and only tokens with a
positive advantage get a gradient.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from common import cache, models, training
from common.rl import rollouts

log = logging.getLogger(__name__)
QUIRK_LOGPROB = 1.0  # what the fork stores as old and reference log-prob when the KL coefficient is 0


@dataclass(frozen=True)
class PPOConfig:
    lr: float = 1e-5
    t_max: int = 20_000
    eta_min: float = 1e-5  # == lr: constant, as in every PPO run of the fork
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-6
    total_steps: int = 10_000  # optimizer steps
    num_rollouts: int = 128  # per collection round
    chunk_size: int = 12  # prompts generated at once while collecting
    batch_size: int = 12  # PPO minibatch
    ppo_epochs: int = 4
    init_kl_coef: float = 0.0  # fixed beta (the fork sets no KL target)
    gamma: float = 1.0
    lam: float = 1.0
    cliprange: float = 0.005
    vf_coef: float = 1.0
    vf_only_steps: int = 200
    replicate_kl0_quirk: bool = False
    max_new_tokens: int = 40  # responses end at EOS (the fork's stop string "</s>") or here
    temperature: float = 1.0
    checkpoint_every: int = 1000
    eval_every: int = 1000


# ---------------------------------------------------------------------------------------------------------------
# The pieces, on [batch, response tokens] tensors; `mask` is 1 on response tokens and 0 on padding after them.

def masked_mean(x: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over response tokens; with `n_tokens` (the whole minibatch's count in a multi-process run) this
    process's share of it, which summed over the processes is the mean."""
    return (x * mask).sum() / (mask.sum() if n_tokens is None else n_tokens).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor | None = None, eps: float = 1e-8
           ) -> torch.Tensor:
    """Zero mean and unit variance over the response tokens of the whole minibatch, every process's share of it
    included (padding left at 0); `n_tokens` is the minibatch's token count when the caller has it."""
    n_tokens = training.sum_over_processes(mask.sum()) if n_tokens is None else n_tokens
    mean = training.sum_over_processes(masked_mean(x, mask, n_tokens))
    var = training.sum_over_processes(masked_mean((x - mean) ** 2, mask, n_tokens))
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, beta: float) -> torch.Tensor:
    """-beta * (log pi - log pi_ref) on every response token, plus the scalar score on the last one."""
    rewards = -beta * (logprobs - ref_logprobs) * mask
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation backwards over the response; the value after the last token is 0.
    Returns (advantages, returns = advantages + values)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(len(rewards), dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def ppo_losses(logprobs: torch.Tensor, values: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               returns: torch.Tensor, mask: torch.Tensor, cliprange: float, n_tokens: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(policy loss, value loss, stats): the clipped surrogate with a token-level ratio, and 0.5 * MSE; token
    means, or with `n_tokens` this process's shares of them (`masked_mean`)."""
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(unclipped, clipped), mask, n_tokens)
    vf_loss = 0.5 * masked_mean((values - returns) ** 2, mask, n_tokens)
    stats = {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(),
             "clipfrac": masked_mean((clipped > unclipped).float(), mask, n_tokens).item(),
             "ratio": masked_mean(ratio, mask, n_tokens).item()}
    return pg_loss, vf_loss, stats


class ValueHead(nn.Module):
    """hidden -> 2*hidden -> 1 with ReLU, fed the detached last hidden state (the value loss never reaches the LM)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden.detach()).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# Rollouts and training

ScoreFn = Callable[[Sequence[int], Sequence[str]], Sequence[float]]  # (prompt indices, response texts) -> scores


def collect(policy, value_head, tokenizer, prompts: Sequence[str], next_prompt: Callable[[], int], score: ScoreFn,
            cfg: PPOConfig, stream: Sequence[int] = ()) -> list[rollouts.Rollout]:
    """Generate chunk by chunk until `num_rollouts` exist; score them; store old log-probs and values, and the
    reference log-probs (no reference pass at KL coefficient 0: the penalty is then zero). Under several processes
    each draws the same prompts and keeps every n-th one, `num_rollouts / n` in all, sampled from its own stream
    for (`stream`, chunk) (`rollouts.process_stream`)."""
    store: list[rollouts.Rollout] = []
    pad = tokenizer.pad_token_id
    while len(store) < cfg.num_rollouts // training.accelerator().num_processes:
        idx = rollouts.process_share([next_prompt() for _ in range(cfg.chunk_size)])
        chunk = [group[0] for group in rollouts.sample(policy, tokenizer, [prompts[i] for i in idx], 1,
                                                       cfg.max_new_tokens, cfg.temperature, cfg.chunk_size,
                                                       generator_seed=rollouts.process_stream(*stream, len(store)))]
        scores = score(idx, [tokenizer.decode(r.response_ids) for r in chunk])
        batch = rollouts.collate(chunk, pad)
        with torch.no_grad():
            logits, hidden = rollouts.response_logits(policy, batch, hidden=True)
            logprobs = rollouts.token_logprobs(logits, batch)
            values = value_head(hidden).cpu() * batch["mask"]
            if cfg.replicate_kl0_quirk and cfg.init_kl_coef == 0:
                logprobs = ref_logprobs = torch.full_like(logprobs, QUIRK_LOGPROB) * batch["mask"]
            elif cfg.init_kl_coef == 0:
                ref_logprobs = logprobs
            else:
                with policy.disable_adapter():
                    ref_logprobs = rollouts.token_logprobs(rollouts.response_logits(policy, batch), batch)
        for i, (r, s) in enumerate(zip(chunk, scores)):
            n = len(r.response_ids)
            r.score = float(s)
            r.extra = {"logprobs": logprobs[i, :n], "ref_logprobs": ref_logprobs[i, :n], "values": values[i, :n]}
        store.extend(chunk)
    return store


def pad_stack(rows: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def train_ppo(policy, tokenizer, prompts: Sequence[str], score: ScoreFn, cfg: PPOConfig, out_dir: Path, seed: int,
              resume: bool = False, evaluate: Callable[[int], dict] | None = None,
              desc: str = "ppo") -> tuple[ValueHead, pd.DataFrame]:
    """PPO on `policy` (a peft model whose adapter is the only trainable part). Returns the value head and the
    training curves (one row per optimizer step; `evaluate(step)` adds columns every `eval_every` steps).

    Each round collects a store of rollouts and makes `ppo_epochs` passes over it, each pass one permutation of
    the store cut into minibatches (the last one smaller when the store does not divide), one optimizer step per
    minibatch. Checkpoints are written at the end of a round (the first after every `checkpoint_every` steps), with
    the prompt order and the random streams, so a resumed run continues exactly as an uninterrupted one. A
    finished run in `out_dir` is loaded instead of retrained; an unfinished one continues with `resume`."""
    out_dir = Path(out_dir)
    acc = training.accelerator()
    n_proc = acc.num_processes
    if cfg.num_rollouts % n_proc or cfg.chunk_size % n_proc or cfg.batch_size % n_proc:
        raise ValueError(f"num_rollouts {cfg.num_rollouts}, chunk_size {cfg.chunk_size} and batch_size "
                         f"{cfg.batch_size} must split over {n_proc} processes")
    torch.manual_seed(seed)  # the value head's initialisation and the rollouts (a resumed run restores the RNG)
    value_head = ValueHead(policy.config.hidden_size).to(next(policy.parameters()).device)
    optimizer, scheduler = training.make_optimizer(
        [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters()), cfg)
    step, history, loop, last_good = training.begin(policy, optimizer, scheduler, out_dir, cfg, resume, desc,
                                                    {"value_head": value_head})
    order = rollouts.PromptOrder(len(prompts), [seed, 31], loop)
    trained = (acc.prepare_model(policy), acc.prepare_model(value_head)) if n_proc > 1 else (policy, value_head)

    if evaluate is not None and step == 0 and acc.is_main_process:  # the starting point, for the curves
        policy.eval()
        history.append({"step": 0, **evaluate(0)})
    bar = tqdm(total=cfg.total_steps, initial=step, desc=desc, disable=not acc.is_main_process)
    saved_at = step
    while step < cfg.total_steps:
        policy.eval()
        store = collect(policy, value_head, tokenizer, prompts, order.next, score, cfg, (seed, step))
        round_stats = training.mean_over_processes({
            "mean_score": float(np.mean([r.score for r in store])),
            "kl": float(np.mean([(r.extra["logprobs"] - r.extra["ref_logprobs"]).sum().item() for r in store])),
            "response_tokens": float(np.mean([len(r.response_ids) for r in store]))})
        policy.train()
        for _ in range(cfg.ppo_epochs):
            permutation = order.rng.permutation(len(store))
            share = cfg.batch_size // n_proc
            for b in range(0, len(store), share):
                minibatch = [store[i] for i in permutation[b : b + share]]
                stats = ppo_step(*trained, optimizer, tokenizer, minibatch, cfg, step, desc, last_good)
                scheduler.step()
                step += 1
                row = {"step": step, **round_stats, **stats, "lr": scheduler.get_last_lr()[0]}
                if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.total_steps) \
                        and acc.is_main_process:
                    policy.eval()
                    row.update(evaluate(step))
                    policy.train()
                history.append(row)
                bar.update(1)
                bar.set_postfix(score=f"{round_stats['mean_score']:.2f}", clip=f"{stats['clipfrac']:.2f}")
                if step >= cfg.total_steps:
                    break
            if step >= cfg.total_steps:
                break
        if step // cfg.checkpoint_every > saved_at // cfg.checkpoint_every or step >= cfg.total_steps:
            if acc.is_main_process:
                training.save_checkpoint(policy, optimizer, scheduler, step, history, out_dir,
                                         {"value_head": value_head}, loop_state=order.state())
            acc.wait_for_everyone()
            last_good, saved_at = training.checkpoint_path(out_dir, step), step
    bar.close()
    policy.eval()
    return value_head, pd.DataFrame(history)


def train_cached(policy, tokenizer, prompts: Sequence[str], score: ScoreFn, cfg: PPOConfig, name: str, run,
                 seed: int, init_key: str, key: Sequence = (), resume: bool = False,
                 evaluate: Callable[[int], dict] | None = None) -> pd.DataFrame:
    """`train_ppo` in a cache folder named by the starting point (`init_key`), the policy's adapter, the run's name,
    settings, seed and prompts, and `key`: everything else the cached run depends on (the reward, the curve
    evaluations' settings). Writes the curves as {name}_curves.csv and returns them."""
    out_dir = cache.cache_dir("ppo", init_key, models.adapter_signature(policy), name, cfg, seed, list(prompts), *key)
    run.cache_hits[f"ppo_{name}"] = training.is_finished(out_dir, cfg)
    with run.stage(f"ppo_{name}"):
        _, curves = train_ppo(policy, tokenizer, prompts, score, cfg, out_dir, seed, resume=resume,
                              evaluate=evaluate, desc=f"PPO {name}")
    run.write_csv(f"{name}_curves.csv", curves)
    return curves


def ppo_step(policy, value_head, optimizer, tokenizer, minibatch: Sequence[rollouts.Rollout], cfg: PPOConfig,
             step: int, desc: str, last_good) -> dict[str, float]:
    """One optimizer step on a minibatch; only the value loss during the first `vf_only_steps`. In a
    multi-process run `policy` and `value_head` are DDP wrappers and `minibatch` is this process's share: token
    means and whitening then cover every share, so the step is the one a single process takes on the whole."""
    batch = rollouts.collate(minibatch, tokenizer.pad_token_id)
    mask, width = batch["mask"], batch["mask"].shape[1]
    old_logprobs, ref_logprobs, old_values = (pad_stack([r.extra[k] for r in minibatch], width)
                                              for k in ("logprobs", "ref_logprobs", "values"))
    rewards = kl_penalized_rewards(torch.tensor([r.score for r in minibatch]), old_logprobs, ref_logprobs, mask,
                                   cfg.init_kl_coef)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    n_tokens = training.sum_over_processes(mask.sum())
    advantages = whiten(advantages, mask, n_tokens)
    vf_only = step < cfg.vf_only_steps
    if vf_only and isinstance(policy, DDP):  # no policy gradient: DDP must not wait for one
        policy = policy.module
    logits, hidden = rollouts.response_logits(policy, batch, hidden=True)
    logprobs, values = rollouts.token_logprobs(logits, batch), value_head(hidden).cpu() * mask
    pg_loss, vf_loss, stats = ppo_losses(logprobs, values, old_logprobs, advantages, returns, mask, cfg.cliprange,
                                         n_tokens)
    loss = cfg.vf_coef * vf_loss if vf_only else pg_loss + cfg.vf_coef * vf_loss
    training.check_finite(training.sum_over_processes(loss.detach()), desc, step + 1, last_good)
    # each process's loss is its share of the token mean; DDP averages gradients, so scale back to their sum
    (loss * training.accelerator().num_processes).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {k: v.item() for k, v in zip(stats, training.sum_over_processes(torch.tensor(list(stats.values()))))}
