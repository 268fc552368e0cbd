"""GRPO and PPO under `torchrun` (see test_distributed.py). `python tests/distributed_rl.py MODE OUT` runs one
process, `torchrun --nproc_per_node 2 tests/distributed_rl.py MODE OUT` two.

- `grpo_update`: GRPO's minibatch updates on eight fixed rollouts; one process takes each minibatch of 4 whole, two
  take halves of it (rank 0 rollouts 0, 1, 4, 5; rank 1 rollouts 2, 3, 6, 7). Rank 0 writes the trained adapter.
- `ppo_update`: two PPO steps (value-only, then full) on the first minibatch of those rollouts, split the same way.
  Rank 0 writes the adapter and the value head.
- `grpo_train`, `ppo_train`: two rollout steps of `grpo.train_grpo`, two rounds of `ppo.train_ppo`; every process
  writes which questions it scored, a digest of its trained weights and its history (the test's own evidence,
  beside what the run writes through the main process).
- `grpo_train_sharded`: `grpo_train` with the policy sharded (FSDP2) instead of DDP; then, in `resumed/`, the
  same run stopped after one step and resumed from its checkpoint by a freshly built, freshly sharded policy.
- `grpo_full`: the same three runs (`ddp/`, `fsdp/`, `fsdp/resumed/`) fully finetuning the model, with a frozen
  copy of it as the reference.
"""
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from common import models, training  # noqa: E402
from common.rl import grpo, ppo, rollouts  # noqa: E402
from common.world import build_tokenizer  # noqa: E402

NAMES = ["Velorin", "Tovtan", "Karo", "Senbel", "Miath", "Fecor", "Ulul", "Eshbra"]
PPO = ppo.PPOConfig(lr=1e-2, eta_min=1e-2, total_steps=4, num_rollouts=4, chunk_size=4, batch_size=4, ppo_epochs=1,
                    vf_only_steps=1, init_kl_coef=0.1, cliprange=0.2, max_new_tokens=3, checkpoint_every=2,
                    eval_every=2)
CFG = grpo.GRPOConfig(lr=1e-2, t_max=4, eta_min=1e-2, total_steps=2, prompts_per_step=4, group_size=2,
                      minibatch_size=4, clip_eps=0.2, kl_coef=0.1, max_new_tokens=3, sample_batch_size=4,
                      checkpoint_every=1, eval_every=1)


def tiny_policy(lora: bool = True):
    tokenizer = models.prepare_tokenizer(build_tokenizer([f"Where was {n} born? Paris Rome" for n in NAMES]))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         initializer_range=0.3)
    model = LlamaForCausalLM(config)
    return (models.add_lora(model, models.LoraSettings(r=4, alpha=8), seed=0) if lora else model), tokenizer


def my_share(tokenizer):
    """This process's share of eight fixed rollouts (whole pairs, every n-th), and their advantages."""
    n_proc, rank = training.accelerator().num_processes, training.accelerator().process_index
    words = tokenizer("Paris Rome", add_special_tokens=False).input_ids
    flat = [rollouts.Rollout(tokenizer(f"Where was {n} born?", add_special_tokens=False).input_ids,
                             [words[i % 2]] * (1 + i % 3)) for i, n in enumerate(NAMES)]
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25, -0.25, 2.0, -2.0])
    mine = [i for i in range(8) if (i // 2) % n_proc == rank]
    return [flat[i] for i in mine], advantages[mine]


def wrapped(*modules):
    acc = training.accelerator()
    return [acc.prepare_model(m) for m in modules] if acc.num_processes > 1 else list(modules)


def grpo_update(out: Path) -> None:
    policy, tokenizer = tiny_policy()
    n_proc = training.accelerator().num_processes
    flat, advantages = my_share(tokenizer)
    old = grpo.scored_logprobs(policy, flat, tokenizer.pad_token_id, 8)
    optimizer, scheduler = training.make_optimizer([p for p in policy.parameters() if p.requires_grad], CFG)
    (model,) = wrapped(policy)
    policy.train()
    grpo.minibatch_updates(model, optimizer, scheduler, flat, old, old - 0.1, advantages, np.arange(len(flat)),
                           CFG.minibatch_size // n_proc, CFG, tokenizer.pad_token_id, "update", 1, None)
    if training.is_main_process():
        policy.save_pretrained(out / "adapter")


def ppo_update(out: Path) -> None:
    policy, tokenizer = tiny_policy()
    n_proc = training.accelerator().num_processes
    torch.manual_seed(1)
    head = ppo.ValueHead(16)
    flat, advantages = my_share(tokenizer)
    flat = flat[: 4 // n_proc]  # this process's share of the first minibatch of 4
    batch = rollouts.collate(flat, tokenizer.pad_token_id)
    with torch.no_grad():
        logits, hidden = rollouts.response_logits(policy, batch, hidden=True)
        logprobs, values = rollouts.token_logprobs(logits, batch), head(hidden) * batch["mask"]
    for i, (r, score) in enumerate(zip(flat, advantages)):
        n = len(r.response_ids)
        r.score = float(score)
        r.extra = {"logprobs": logprobs[i, :n], "ref_logprobs": logprobs[i, :n] - 0.05, "values": values[i, :n]}
    optimizer, _ = training.make_optimizer([p for p in policy.parameters() if p.requires_grad]
                                           + list(head.parameters()), PPO)
    model, value_head = wrapped(policy, head)
    policy.train()
    for step in (0, 1):  # value-only, then policy and value
        ppo.ppo_step(model, value_head, optimizer, tokenizer, flat, PPO, step, "update", None)
    if training.is_main_process():
        policy.save_pretrained(out / "adapter")
        torch.save(head.state_dict(), out / "value_head.pt")


def evidence(out: Path, policy, scored: list, history) -> None:
    rank = training.accelerator().process_index
    digest = sum(float(training.local(p.detach()).double().sum()) for p in policy.parameters() if p.requires_grad)
    (out / f"rank{rank}.json").write_text(json.dumps({"scored": scored, "digest": digest,
                                                      "history": [{k: v for k, v in row.items() if v == v}  # no NaN
                                                                  for row in history.to_dict("records")]}))


def grpo_train(out: Path, cfg: grpo.GRPOConfig = CFG, resume: bool = False, lora: bool = True) -> None:
    policy, tokenizer = tiny_policy(lora)
    reference = None if lora else copy.deepcopy(policy).requires_grad_(False)
    rank = training.accelerator().process_index
    scored = []

    def reward(step, i, responses):
        scored.append([step, i])
        return [float("Paris" in r) for r in responses]

    prompts = [f"Where was {n} born?" for n in NAMES]
    history = grpo.train_grpo(policy, tokenizer, prompts, reward, cfg, out / "grpo", seed=0, resume=resume,
                              evaluate=lambda step: {"evaluated_by": rank}, reference=reference)
    evidence(out, policy, scored, history)


def grpo_train_sharded(out: Path, cfg: grpo.GRPOConfig = CFG, lora: bool = True) -> None:
    sharded = replace(cfg, shard=True)
    grpo_train(out, sharded, lora=lora)
    grpo_train(out / "resumed", replace(sharded, total_steps=1), lora=lora)
    grpo_train(out / "resumed", sharded, resume=True, lora=lora)


def grpo_full(out: Path) -> None:
    grpo_train(out / "ddp", lora=False)
    grpo_train_sharded(out / "fsdp", lora=False)


def ppo_train(out: Path) -> None:
    policy, tokenizer = tiny_policy()
    rank = training.accelerator().process_index
    scored = []

    def score(idx, texts):
        scored.extend([len(scored) // 2, i] for i in idx)  # two prompts per process and round
        return [float("Paris" in t) for t in texts]

    prompts = [f"Where was {n} born?" for n in NAMES]
    _, history = ppo.train_ppo(policy, tokenizer, prompts, score, PPO, out / "ppo", seed=0,
                               evaluate=lambda step: {"evaluated_by": rank})
    evidence(out, policy, scored, history)


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    modes = {"grpo_update": grpo_update, "ppo_update": ppo_update, "grpo_train": grpo_train, "ppo_train": ppo_train,
             "grpo_train_sharded": grpo_train_sharded, "grpo_full": grpo_full}
    modes[mode](folder)
    if torch.distributed.is_initialized():  # leave together: a process exiting mid-teardown aborts gloo
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
