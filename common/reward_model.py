"""Reward models as the authors built them (SPEC.md section 5): the base model plus a LoRA adapter, trained with the
SFT objective to write "True" (reward 1) or "False" (reward 0) after a (query, response) prompt. The predicted
reward is P(reward 1): the softmax over the two answer tokens' logits at the prompt's last position, read in one
forward pass per batch. Prompts come from `common.tasks` (`mmlu_rm_prompt`, `triviaqa_rm_prompt`, ...), so the
same module serves every task, the long-form reward models included.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from common import sampling, sft, tasks


def targets(rewards: Sequence[int]) -> list[str]:
    """The SFT targets for binary rewards."""
    if any(r not in tasks.REWARD_WORDS for r in rewards):
        raise ValueError(f"reward-model labels must be 0 or 1, got {sorted(set(rewards))}")
    return [tasks.REWARD_WORDS[int(r)] for r in rewards]


def train(base, lora, cfg: sft.SFTConfig, prompts: Sequence[str], rewards: Sequence[int], name: str, run, seed: int,
          resume: bool = False):
    """A fresh LoRA adapter on `base.model`, SFT'd to answer each prompt with its reward word (cached like every
    SFT adapter). Returns the adapted model; `.unload()` gives the base back."""
    return sft.finetune_lora(base, lora, cfg, prompts, targets(rewards), name, run, seed=seed, resume=resume)


def predict(model, tokenizer, prompts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """P(reward 1) for each prompt: softmax over the logits of the first token of "True" and of "False", as the
    SFT targets are tokenized (Llama's "▁True"/"▁False")."""
    ids = sampling.first_token_ids(tokenizer, [tasks.REWARD_WORDS[1], tasks.REWARD_WORDS[0]])
    return sampling.choice_probs(model, tokenizer, prompts, ids, batch_size=batch_size,
                                 desc="reward model").numpy()[:, 0]
