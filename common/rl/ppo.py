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
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from common import training

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
    max_new_tokens: int = 40
    temperature: float = 1.0
    stop: tuple[str, ...] = ()
    checkpoint_every: int = 1000
    eval_every: int = 1000


# ---------------------------------------------------------------------------------------------------------------
# The pieces, on [batch, response tokens] tensors; `mask` is 1 on response tokens and 0 on padding after them.

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean and unit variance over the response tokens (padding left at 0)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
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
               returns: torch.Tensor, mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    dict[str, float]]:
    """(policy loss, value loss, stats): the clipped surrogate with a token-level ratio, and 0.5 * MSE."""
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(unclipped, clipped), mask)
    vf_loss = 0.5 * masked_mean((values - returns) ** 2, mask)
    stats = {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(),
             "clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
             "ratio": masked_mean(ratio, mask).item()}
    return pg_loss, vf_loss, stats


class ValueHead(nn.Module):
    """hidden -> 2*hidden -> 1 with ReLU, fed the detached last hidden state (the value loss never reaches the LM)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden.detach()).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# Rollouts

@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]
    score: float
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    first_tokens: Sequence[int] | None = None  # the only tokens the response may start with (None: any)


def restrict_first_token(logits: torch.Tensor, first_tokens: Sequence[Sequence[int] | None]) -> torch.Tensor:
    """`logits` [batch, vocab] of each response's first token with every token outside its allowed set at -inf,
    so sampling and log-probs describe the same restricted policy."""
    if all(tokens is None for tokens in first_tokens):
        return logits
    allowed = torch.ones_like(logits, dtype=torch.bool)
    for i, tokens in enumerate(first_tokens):
        if tokens is not None:
            allowed[i] = False
            allowed[i, list(tokens)] = True
    return logits.masked_fill(~allowed, float("-inf"))


class FirstTokenRestriction(LogitsProcessor):
    """`restrict_first_token` during `generate`, at the first new position only (input_ids then end at the
    left-padded prompt)."""

    def __init__(self, first_tokens: Sequence[Sequence[int] | None], prompt_width: int):
        self.first_tokens, self.prompt_width = first_tokens, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != self.prompt_width:
            return scores
        return restrict_first_token(scores, self.first_tokens)


def cut_response(ids: list[int], tokenizer, stop: Sequence[str]) -> list[int]:
    """The response up to and including EOS, or up to the first token whose text completes a stop string."""
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
    if stop:
        for n in range(1, len(ids) + 1):
            if any(s in tokenizer.decode(ids[:n], skip_special_tokens=True) for s in stop):
                return ids[:n]
    return ids


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: Sequence[str], cfg: PPOConfig,
                       first_tokens: Sequence[Sequence[int] | None] | None = None,
                       ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per prompt: one sample each at the configured temperature, with the KV cache;
    the first token drawn from each prompt's `first_tokens` where given."""
    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    restriction = [] if first_tokens is None else [FirstTokenRestriction(first_tokens, enc["input_ids"].shape[1])]
    seqs = model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
                          logits_processor=LogitsProcessorList(restriction),
                          max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, use_cache=True)
    width = enc["input_ids"].shape[1]
    out = []
    for row, attn, seq in zip(enc["input_ids"], enc["attention_mask"], seqs):
        prompt = row[attn.bool()].tolist()
        response = cut_response(seq[width:].tolist(), tokenizer, cfg.stop)
        out.append((prompt, response or [tokenizer.eos_token_id]))
    return out


def collate(rollouts: Sequence[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded and responses right-padded, so every response starts at the same column."""
    p_width = max(len(r.prompt_ids) for r in rollouts)
    r_width = max(len(r.response_ids) for r in rollouts)
    ids = torch.full((len(rollouts), p_width + r_width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    mask = torch.zeros((len(rollouts), r_width))
    for i, r in enumerate(rollouts):
        ids[i, p_width - len(r.prompt_ids) : p_width] = torch.tensor(r.prompt_ids)
        ids[i, p_width : p_width + len(r.response_ids)] = torch.tensor(r.response_ids)
        attention[i, p_width - len(r.prompt_ids) : p_width + len(r.response_ids)] = 1
        mask[i, : len(r.response_ids)] = 1
    return {"input_ids": ids, "attention_mask": attention, "mask": mask, "prompt_width": p_width,
            "first_tokens": [r.first_tokens for r in rollouts]}


def forward_response(model, value_head: ValueHead | None, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens (and the value at each response position)."""
    device = next(model.parameters()).device
    ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    out = model(input_ids=ids, attention_mask=attention, output_hidden_states=value_head is not None, use_cache=False)
    start, width = batch["prompt_width"], batch["mask"].shape[1]
    logits = out.logits[:, start - 1 : start - 1 + width].float()
    logits = torch.cat([restrict_first_token(logits[:, 0], batch["first_tokens"])[:, None], logits[:, 1:]], 1)
    logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, start : start + width, None])[..., 0].cpu()
    values = None
    if value_head is not None:
        values = value_head(out.hidden_states[-1][:, start - 1 : start - 1 + width].float()).cpu()
    return logprobs * batch["mask"], values


# ---------------------------------------------------------------------------------------------------------------
# Training

ScoreFn = Callable[[Sequence[int], Sequence[str]], Sequence[float]]  # (prompt indices, response texts) -> scores


def collect(policy, value_head, tokenizer, prompts: Sequence[str], order: Callable[[], int], score: ScoreFn,
            cfg: PPOConfig, first_tokens: Sequence[Sequence[int]] | None = None) -> list[Rollout]:
    """Generate chunk by chunk until `num_rollouts` exist; score them; store old and reference log-probs and
    values."""
    store: list[Rollout] = []
    while len(store) < cfg.num_rollouts:
        idx = [order() for _ in range(cfg.chunk_size)]
        allowed = [None] * len(idx) if first_tokens is None else [first_tokens[i] for i in idx]
        pairs = generate_responses(policy, tokenizer, [prompts[i] for i in idx], cfg, allowed)
        texts = [tokenizer.decode(r, skip_special_tokens=False) for _, r in pairs]
        scores = score(idx, texts)
        chunk = [Rollout(p, r, float(s), first_tokens=a) for (p, r), s, a in zip(pairs, scores, allowed)]
        batch = collate(chunk, tokenizer.pad_token_id)
        with torch.no_grad():
            logprobs, values = forward_response(policy, value_head, batch)
            if cfg.replicate_kl0_quirk and cfg.init_kl_coef == 0:
                logprobs = ref_logprobs = torch.full_like(logprobs, QUIRK_LOGPROB) * batch["mask"]
            else:
                with policy.disable_adapter():
                    ref_logprobs, _ = forward_response(policy, None, batch)
        for i, r in enumerate(chunk):
            n = len(r.response_ids)
            r.logprobs, r.ref_logprobs, r.values = logprobs[i, :n], ref_logprobs[i, :n], values[i, :n]
        store.extend(chunk)
    return store


def pad_stack(rows: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def train_ppo(policy, tokenizer, prompts: Sequence[str], score: ScoreFn, cfg: PPOConfig, out_dir: Path, seed: int,
              resume: bool = False, evaluate: Callable[[int], dict] | None = None,
              desc: str = "ppo", first_tokens: Sequence[Sequence[int]] | None = None) -> tuple[ValueHead, pd.DataFrame]:
    """PPO on `policy` (a peft model whose adapter is the only trainable part). Returns the value head and the
    training curves (one row per optimizer step; `evaluate(step)` adds columns every `eval_every` steps).
    `first_tokens[i]`, where given, are the only tokens a response to prompt i may start with: the policy is then
    the model's distribution renormalised over them, for sampling, old, new and reference log-probs alike.
    A finished run in `out_dir` is loaded instead of retrained; an unfinished one continues with `resume`."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    value_head = ValueHead(policy.config.hidden_size).to(next(policy.parameters()).device)
    optimizer, scheduler = training.make_optimizer(
        [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters()), cfg)
    rng = np.random.default_rng([seed, 31])
    step, history = 0, []
    last_good = training.latest_checkpoint(out_dir)
    if last_good is not None and (resume or training.is_finished(out_dir, cfg)):
        step, history, _ = training.load_checkpoint(policy, optimizer, scheduler, last_good,
                                                       {"value_head": value_head})
        rng = np.random.default_rng([seed, 31, step])
        log.info("%s: %s %s (step %d)", desc, "loaded" if step >= cfg.total_steps else "resumed from", last_good,
                 step)
    else:
        last_good = None
    queue: list[int] = []

    def order() -> int:  # the fork's shuffled, endless prompt loader
        if not queue:
            queue.extend(rng.permutation(len(prompts)).tolist())
        return queue.pop()

    if evaluate is not None and step == 0:  # the starting point, for the curves
        policy.eval()
        history.append({"step": 0, **evaluate(0)})
    bar = tqdm(total=cfg.total_steps, initial=step, desc=desc)
    while step < cfg.total_steps:
        policy.eval()
        store = collect(policy, value_head, tokenizer, prompts, order, score, cfg, first_tokens)
        round_stats = {"mean_score": float(np.mean([r.score for r in store])),
                       "kl": float(np.mean([(r.logprobs - r.ref_logprobs).sum().item() for r in store])),
                       "response_tokens": float(np.mean([len(r.response_ids) for r in store]))}
        policy.train()
        for _ in range(cfg.ppo_epochs):
            for b in range(0, len(store) - cfg.batch_size + 1, cfg.batch_size):
                minibatch = [store[i] for i in rng.permutation(len(store))[b : b + cfg.batch_size]]
                stats = ppo_step(policy, value_head, optimizer, tokenizer, minibatch, cfg, step, desc, last_good)
                scheduler.step()
                step += 1
                row = {"step": step, **round_stats, **stats, "lr": scheduler.get_last_lr()[0]}
                if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.total_steps):
                    policy.eval()
                    row.update(evaluate(step))
                    policy.train()
                history.append(row)
                bar.update(1)
                bar.set_postfix(score=f"{round_stats['mean_score']:.2f}", clip=f"{stats['clipfrac']:.2f}")
                if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
                    last_good = training.save_checkpoint(policy, optimizer, scheduler, step, history, out_dir,
                                                    {"value_head": value_head})
                if step >= cfg.total_steps:
                    break
            if step >= cfg.total_steps:
                break
    bar.close()
    policy.eval()
    return value_head, pd.DataFrame(history)


def ppo_step(policy, value_head, optimizer, tokenizer, minibatch: Sequence[Rollout], cfg: PPOConfig, step: int,
             desc: str, last_good) -> dict[str, float]:
    """One optimizer step on a minibatch; only the value loss during the first `vf_only_steps`."""
    batch = collate(minibatch, tokenizer.pad_token_id)
    mask, width = batch["mask"], batch["mask"].shape[1]
    old_logprobs = pad_stack([r.logprobs for r in minibatch], width)
    ref_logprobs = pad_stack([r.ref_logprobs for r in minibatch], width)
    old_values = pad_stack([r.values for r in minibatch], width)
    rewards = kl_penalized_rewards(torch.tensor([r.score for r in minibatch]), old_logprobs, ref_logprobs, mask,
                                   cfg.init_kl_coef)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    advantages = whiten(advantages, mask)
    logprobs, values = forward_response(policy, value_head, batch)
    pg_loss, vf_loss, stats = ppo_losses(logprobs, values, old_logprobs, advantages, returns, mask, cfg.cliprange)
    loss = cfg.vf_coef * vf_loss if step < cfg.vf_only_steps else pg_loss + cfg.vf_coef * vf_loss
    training.check_finite(loss, desc, step + 1, last_good)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats
