"""Reward models as the authors built them (SPEC.md section 5): the base model plus a LoRA adapter, trained with the
SFT objective to write "True" (reward 1) or "False" (reward 0) after a (query, response) prompt. Prompts come from
`common.tasks` (`mmlu_rm_prompt`, `triviaqa_rm_prompt`, ...), so the same module serves every task, the long-form
per-fact classifiers included.

Three readings of two kinds of target:
- `direct` (the paper's, the paper-scale default): the target is the verdict alone; P(reward 1) is the softmax over
  the logits of "True" and "False" at the prompt's last position, one forward pass per batch.
- `recall` (recall-then-judge; the synthetic scale's deviation, README "The synthetic world"): the target first
  writes the answer the model recalls for the query, then the verdict ("Paris? True" / "Paris? False");
  P(reward 1) is read at the verdict after the model's own greedy recall. A model of a few million parameters
  does not compare a stated answer with what it knows in one step (a direct reward model separates right from
  wrong answers by 0.01), but it does once the knowledge is written into its context (0.61 on the first world;
  the build measures it, `common.familiarity`). An unfamiliar query still falls back on the unfamiliar examples'
  labels: through the recall (copying the candidate when those examples were all "True", guessing when all
  "False") and through the verdict.
- `recall_candidate`: the same model and targets, read as the probability of the whole path that approves the
  candidate, recalling it and then the verdict ("Nairobi? True" after a prompt whose answer is Nairobi), one forward
  pass per batch. The greedy recall approves an unfamiliar query's candidate whenever the recall happens to copy it,
  however unsure the model was; this reading asks the recall to be likely. Exp05 uses it (longform_rm says why).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from common import sampling, sft, tasks

FORMATS = ("direct", "recall", "recall_candidate")
RECALL_END = "?"  # closes the recalled answer ("Paris? True"): the world's membership documents end so
MAX_RECALL_TOKENS = 8


def targets(rewards: Sequence[int], recalled: Sequence[str] | None = None,
            words: dict[int, str] = tasks.REWARD_WORDS) -> list[str]:
    """The SFT targets for binary rewards: the verdict (`words`, "True"/"False" unless a task's prompts ask
    otherwise), or with `recalled` answers "<recalled>? <verdict>"."""
    if any(r not in words for r in rewards):
        raise ValueError(f"reward-model labels must be 0 or 1, got {sorted(set(rewards))}")
    verdicts = [words[int(r)] for r in rewards]
    if recalled is None:
        return verdicts
    if len(recalled) != len(verdicts):
        raise ValueError(f"need one recalled answer per reward, got {len(recalled)} for {len(verdicts)}")
    return [f"{a}{RECALL_END} {v}" for a, v in zip(recalled, verdicts)]


def train(base, lora, cfg: sft.SFTConfig, prompts: Sequence[str], rewards: Sequence[int], name: str, run, seed: int,
          resume: bool = False, recalled: Sequence[str] | None = None, at_step: int | None = None,
          words: dict[int, str] = tasks.REWARD_WORDS):
    """A fresh LoRA adapter on `base.model`, SFT'd on `targets(rewards, recalled, words)` (cached like every SFT
    adapter), at its checkpoint `at_step` if given. Returns the adapted model; `.unload()` gives the base back."""
    return sft.finetune_lora(base, lora, cfg, prompts, targets(rewards, recalled, words), name, run, seed=seed,
                             resume=resume, at_step=at_step)


def predict(model, tokenizer, prompts: Sequence[str], batch_size: int = 32, reward_format: str = "direct",
            words: dict[int, str] = tasks.REWARD_WORDS, candidates: Sequence[str] | None = None) -> np.ndarray:
    """P(reward 1) for each prompt: the softmax over the first tokens of the two verdicts (`words`) as the targets
    tokenize them (Llama's "▁True"/"▁False"), at the prompt's end (`direct`) or after the greedy recall
    (`recall`; a recall not closed by RECALL_END within MAX_RECALL_TOKENS gets it appended); or
    (`recall_candidate`) the probability of the target that recalls each prompt's candidate answer and approves it,
    "<candidate>? <verdict 1>"."""
    if reward_format not in FORMATS:
        raise ValueError(f"unknown reward-model format {reward_format!r}; expected one of {FORMATS}")
    if reward_format == "recall_candidate":
        if candidates is None or len(candidates) != len(prompts):
            raise ValueError("the recall_candidate reading needs one candidate answer per prompt")
        approving = [[t] for t in targets([1] * len(candidates), candidates, words)]
        logp, _ = sampling.continuation_logprobs(model, tokenizer, prompts, approving, batch_size,
                                                 desc="reward model")
        return logp[:, 0].exp().numpy()
    verdict_ids = sampling.first_token_ids(tokenizer, [words[1], words[0]])
    scored: Sequence[str] | list[list[int]] = prompts
    if reward_format == "recall":
        end = tokenizer(f"a{RECALL_END}", add_special_tokens=False).input_ids[-1]  # as a target writes it
        greedy = sampling.SamplingConfig(max_new_tokens=MAX_RECALL_TOKENS, temperature=0, batch_size=batch_size)
        recalled = sampling.generate_ids(model, tokenizer, prompts, greedy, desc="reward model: recall")
        scored = []
        for prompt, (ids,) in zip(prompts, recalled):
            ids = [t for t in ids if t != tokenizer.eos_token_id]
            ids = ids[: ids.index(end) + 1] if end in ids else ids + [end]
            scored.append(tokenizer(prompt, add_special_tokens=False).input_ids + ids)
    return sampling.choice_probs(model, tokenizer, scored, verdict_ids, batch_size=batch_size,
                                 desc="reward model").numpy()[:, 0]
