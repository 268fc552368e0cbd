"""GRPO under `torchrun` (see test_distributed.py). `python tests/distributed_grpo.py MODE OUT` runs one process,
`torchrun --nproc_per_node 2 tests/distributed_grpo.py MODE OUT` two.

- `update`: the minibatch updates on eight fixed rollouts; one process takes each minibatch of 4 whole, two take
  halves of it (rank 0 rollouts 0, 1, 4, 5; rank 1 rollouts 2, 3, 6, 7). Rank 0 writes the trained adapter.
- `train`: two rollout steps of `grpo.train_grpo`; every process writes which questions it scored and a digest of
  its trained weights (the test's own evidence, beside what the run writes through the main process).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from common import models, training  # noqa: E402
from common.rl import grpo, rollouts  # noqa: E402
from common.world import build_tokenizer  # noqa: E402

NAMES = ["Velorin", "Tovtan", "Karo", "Senbel", "Miath", "Fecor", "Ulul", "Eshbra"]
CFG = grpo.GRPOConfig(lr=1e-2, t_max=4, eta_min=1e-2, total_steps=2, prompts_per_step=4, group_size=2,
                      minibatch_size=4, clip_eps=0.2, kl_coef=0.1, max_new_tokens=3, sample_batch_size=4,
                      checkpoint_every=1, eval_every=1)


def tiny_policy():
    tokenizer = models.prepare_tokenizer(build_tokenizer([f"Where was {n} born? Paris Rome" for n in NAMES]))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         initializer_range=0.3)
    return models.add_lora(LlamaForCausalLM(config), models.LoraSettings(r=4, alpha=8), seed=0), tokenizer


def update(out: Path) -> None:
    policy, tokenizer = tiny_policy()
    acc = training.accelerator()
    n_proc, rank = acc.num_processes, acc.process_index
    words = tokenizer("Paris Rome", add_special_tokens=False).input_ids
    flat = [rollouts.Rollout(tokenizer(f"Where was {n} born?", add_special_tokens=False).input_ids,
                             [words[i % 2]] * (1 + i % 3)) for i, n in enumerate(NAMES)]
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25, -0.25, 2.0, -2.0])
    mine = [i for i in range(8) if (i // 2) % n_proc == rank]  # whole pairs: each process's share of a minibatch
    flat, advantages = [flat[i] for i in mine], advantages[mine]
    old = grpo.scored_logprobs(policy, flat, tokenizer.pad_token_id, 8)
    optimizer, scheduler = training.make_optimizer([p for p in policy.parameters() if p.requires_grad], CFG)
    model = acc.prepare_model(policy) if n_proc > 1 else policy
    policy.train()
    grpo.minibatch_updates(model, optimizer, scheduler, flat, old, old - 0.1, advantages, np.arange(len(flat)),
                           CFG.minibatch_size // n_proc, CFG, tokenizer.pad_token_id, "update", 1, None)
    if acc.is_main_process:
        policy.save_pretrained(out / "adapter")


def train(out: Path) -> None:
    policy, tokenizer = tiny_policy()
    rank = training.accelerator().process_index
    scored = []

    def reward(step, i, responses):
        scored.append([step, i])
        return [float("Paris" in r) for r in responses]

    prompts = [f"Where was {n} born?" for n in NAMES]
    history = grpo.train_grpo(policy, tokenizer, prompts, reward, CFG, out / "grpo", seed=0,
                              evaluate=lambda step: {"evaluated_by": rank})
    digest = sum(float(p.detach().double().sum()) for p in policy.parameters() if p.requires_grad)
    (out / f"rank{rank}.json").write_text(json.dumps({"scored": scored, "digest": digest,
                                                      "history": history.to_dict("records")}))


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    {"update": update, "train": train}[mode](folder)
