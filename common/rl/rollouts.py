"""Rollouts that PPO and GRPO share: sampling responses as token ids, batching (prompt, response) pairs, and the
policy's per-token log-probabilities of its responses.

The log-probs a loss sees must be the ones the rollout was sampled under: every batch is laid out the same way
(prompts left-padded, responses right-padded after them), position ids count real tokens only (as `generate`
counts them), and log-probs are taken in fp32. A policy scoring its own fresh rollout therefore reproduces its
collection log-probs whatever else shares the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from common import sampling, training


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]
    score: float = 0.0
    extra: dict = field(default_factory=dict)  # what an algorithm stores per rollout (old log-probs, values, ...)


class PromptOrder:
    """The prompts in shuffled passes, reshuffled at every pass (the authors' fork's endless loader), with the
    generator the algorithm also draws its minibatch orders from; `state` is what a checkpoint keeps so a resumed
    run continues the same order and streams."""

    def __init__(self, n_prompts: int, seed_key: Sequence[int], state: dict | None = None):
        self.n_prompts = n_prompts
        self.rng = np.random.default_rng(seed_key)
        self.queue: list[int] = []
        if state is not None:
            self.rng.bit_generator.state = state["rng"]
            self.queue = list(state["queue"])

    def next(self) -> int:
        if not self.queue:
            self.queue.extend(self.rng.permutation(self.n_prompts).tolist())
        return self.queue.pop()

    def state(self) -> dict:
        return {"queue": list(self.queue), "rng": self.rng.bit_generator.state}


def process_share(items: list) -> list:
    """This process's share of what every process drew alike: every n-th item from its rank (all with one)."""
    acc = training.accelerator()
    return items[acc.process_index :: acc.num_processes]


def process_stream(*key: int) -> int | None:
    """The sampling seed of this process's own stream for `key` (e.g. seed and step) in a multi-process run, so a
    resumed run samples as an uninterrupted one; None with one process, which draws from the global stream its
    checkpoints keep."""
    acc = training.accelerator()
    if acc.num_processes == 1:
        return None
    return int(np.random.SeedSequence([*key, acc.process_index]).generate_state(1)[0])


def sample(model, tokenizer, prompts: Sequence[str], num_samples: int, max_new_tokens: int, temperature: float,
           batch_size: int, desc: str = "rollouts", generator_seed: int | None = None,
           cache: str = "dynamic") -> list[list[Rollout]]:
    """`num_samples` responses per prompt (one encoding of the prompt each, KV cache), each ending at its EOS
    (kept, so the policy learns to stop) or after `max_new_tokens`; drawn from the global torch stream, or from
    `generator_seed`'s own (`sampling.generate_ids`)."""
    cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, num_samples=num_samples,
                                  batch_size=batch_size, cache=cache)
    responses = sampling.generate_ids(model, tokenizer, prompts, cfg, desc=desc, generator_seed=generator_seed)
    out = []
    for prompt, group in zip(prompts, responses):
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        out.append([Rollout(prompt_ids, ids or [tokenizer.eos_token_id]) for ids in group])
    return out


def collate(rollouts: Sequence[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded and responses right-padded, so every response starts at the same column; position ids
    count each row's real tokens from 0; `mask` is 1 on response tokens."""
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
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attention, "position_ids": positions, "mask": mask,
            "prompt_width": p_width}


def response_logits(model, batch: dict, hidden: bool = False):
    """fp32 logits at the positions that predict each response token (and, with `hidden`, the last hidden state
    there). The LM head runs on those positions only (the prompt's other logits would be discarded; bit-identical
    logits, measured)."""
    device = next(model.parameters()).device
    start, width = batch["prompt_width"], batch["mask"].shape[1]
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                position_ids=batch["position_ids"].to(device), output_hidden_states=hidden, use_cache=False,
                logits_to_keep=width + 1)
    logits = out.logits[:, :width].float()
    return (logits, out.hidden_states[-1][:, start - 1 : start - 1 + width].float()) if hidden else logits


def token_logprobs(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """log pi(response token) per position, 0 on padding; [batch, response width] on the CPU."""
    start, width = batch["prompt_width"], batch["mask"].shape[1]
    targets = batch["input_ids"][:, start : start + width].to(logits.device)
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0].cpu()
    return logprobs * batch["mask"]
