"""Completions per second of `common.rl.grpo` and of TRL's `GRPOTrainer` on one configuration (issue: exp06).

Both train a fresh LoRA adapter (q/v, r=16) on the synthetic world's model, CPU, 2 threads, on the same SimpleFact
prompts (exp06's balanced prompt, the world's finetuning questions), the same reward (SimpleFact's group reward,
setting both), group size, new-token budget, completions per optimizer step, KL coefficient and number of rollout
steps, and are timed after a warm-up step (model loading and TRL's setup excluded). Both sample with transformers'
generate, once with its dynamic KV cache (either's default: the headline) and once with the static one. TRL is an
optional extra: `pip install trl`.

    python benchmarks/grpo_vs_trl.py [--steps 40] [--seed 0]

Writes results/benchmarks/grpo_vs_trl.json: {"ours": ..., "trl": ..., "ratio": ..., "static_cache": {...},
"config": {...}}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import models, results, simplefact  # noqa: E402
from common.rl import grpo, rollouts  # noqa: E402

CONFIG = dict(prompts_per_step=16, group_size=8, minibatch_size=32, max_new_tokens=16, kl_coef=0.05, lr=2e-3,
              clip_eps=0.2, threads=2)


def load(seed: int):
    base = models.load_base("synthetic", "default", seed)
    questions = base.world.triviaqa_splits()["finetune"]
    prompts = [f"Be balanced. Q: {q.question}\nA:" for q in questions]
    return base, questions, prompts


def group_rewards(questions, texts_by_group):
    return [simplefact.group_reward([simplefact.classify(t, q) for t in texts]) for q, texts in texts_by_group]


def run_ours(base, questions, prompts, steps: int, seed: int, cache: str) -> tuple[float, float]:
    cfg = grpo.GRPOConfig(lr=CONFIG["lr"], eta_min=CONFIG["lr"], total_steps=steps + 1,
                          prompts_per_step=CONFIG["prompts_per_step"], group_size=CONFIG["group_size"],
                          minibatch_size=CONFIG["minibatch_size"], clip_eps=CONFIG["clip_eps"],
                          kl_coef=CONFIG["kl_coef"], max_new_tokens=CONFIG["max_new_tokens"],
                          checkpoint_every=10**9, eval_every=1, sample_batch_size=CONFIG["prompts_per_step"],
                          cache=cache)
    policy = models.add_lora(base.model, models.LoraSettings(), seed=0)
    stamps = []

    def stamp(step):  # called at step 0 and after every rollout step's last optimizer step
        stamps.append(time.perf_counter())
        return {}

    def reward(step, i, texts):
        return group_rewards(questions, [(questions[i], texts)])[0]

    sampling_s = []  # where the time goes: sampling the groups vs everything else (scoring, loss, updates)
    sample = rollouts.sample

    def timed_sample(*args, **kwargs):
        t0 = time.perf_counter()
        out = sample(*args, **kwargs)
        sampling_s.append(time.perf_counter() - t0)
        return out

    rollouts.sample = timed_sample
    try:
        with tempfile.TemporaryDirectory() as out:
            grpo.train_grpo(policy, base.tokenizer, prompts, reward, cfg, Path(out), seed=seed, evaluate=stamp)
    finally:
        rollouts.sample = sample
    base.model = policy.unload()
    elapsed = stamps[-1] - stamps[1]  # after the warm-up step
    return steps * CONFIG["prompts_per_step"] * CONFIG["group_size"] / elapsed, sum(sampling_s[1:]) / elapsed


def run_trl(base, questions, prompts, steps: int, seed: int, cache: str) -> float:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    by_prompt = dict(zip(prompts, questions))
    g = CONFIG["group_size"]

    def reward(prompts, completions, **kwargs):  # one process: the whole generation batch, groups consecutive
        groups = [(by_prompt[prompts[i]], completions[i : i + g]) for i in range(0, len(completions), g)]
        return [r for rs in group_rewards(questions, groups) for r in rs]

    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    per_step = CONFIG["prompts_per_step"] * g
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                          logging_steps=10**6, learning_rate=CONFIG["lr"], lr_scheduler_type="constant",
                          num_generations=g, per_device_train_batch_size=CONFIG["minibatch_size"],
                          steps_per_generation=per_step // CONFIG["minibatch_size"], num_iterations=1,
                          max_completion_length=CONFIG["max_new_tokens"], beta=CONFIG["kl_coef"],
                          epsilon=CONFIG["clip_eps"], importance_sampling_level="sequence", temperature=1.0,
                          max_steps=(steps + 1) * per_step // CONFIG["minibatch_size"], seed=seed,
                          scale_rewards="none", disable_dropout=True, cache_implementation=cache)
        trainer = GRPOTrainer(model=base.model, reward_funcs=reward, args=args,
                              train_dataset=Dataset.from_dict({"prompt": prompts}),
                              processing_class=base.tokenizer, callbacks=[Stamp()],
                              peft_config=LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                     task_type="CAUSAL_LM"))
        trainer.train()
    optimizer_steps = per_step // CONFIG["minibatch_size"]
    start, end = stamps[optimizer_steps - 1], stamps[-1]  # after the warm-up rollout step's optimizer steps
    return steps * per_step / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(CONFIG["threads"])
    base, questions, prompts = load(args.seed)
    measured = {}
    for cache in ("dynamic", "static"):
        ours, sampling_share = run_ours(base, questions, prompts, args.steps, args.seed, cache)
        trl = run_trl(base, questions, prompts, args.steps, args.seed, cache)
        measured[cache] = {"ours": round(ours, 1), "trl": round(trl, 1), "ratio": round(ours / trl, 2),
                           "ours_sampling_share": round(sampling_share, 3)}
    out = {**measured["dynamic"], "static_cache": measured["static"],
           "config": {**CONFIG, "steps_timed": args.steps, "seed": args.seed, "unit": "completions per second",
                      "packages": results.package_versions() | {"trl": __import__("trl").__version__}}}
    results.write_json(ROOT / "results" / "benchmarks" / "grpo_vs_trl.json", out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
