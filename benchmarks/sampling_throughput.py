"""Tokens per second of `common.sampling.generate`'s backends (issue: paper scale, fast sampling).

`token-ids`: today's `sampling.StopOnStrings`, which decodes only the rows whose newest token can complete a stop
string, and only their last few tokens. `decode-all`: the check it replaced, which decoded every row's whole
continuation at every step. `static-cache`: token-ids with a KV cache allocated once (`SamplingConfig.cache`;
transformers compiles the forward pass for it on CUDA, runs it eagerly on CPU). All sample the same prompts
(few-shot Q/A prompts of the synthetic world's finetuning questions, T=1, stop at a newline) with the same seed,
so they must return the same samples; the script checks that. Without CUDA it runs the world's model on the CPU;
with CUDA on the GPU.

    python benchmarks/sampling_throughput.py [--prompts 512] [--batch-size 256] [--max-new-tokens 40] [--seed 0]

Writes results/benchmarks/sampling_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import StoppingCriteria

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import models, results, sampling, tasks  # noqa: E402


class DecodeAll(StoppingCriteria):
    """The replaced check: decode every row's whole continuation, every step."""

    def __init__(self, tokenizer, stop, prompt_len):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, tuple(stop), prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def timed(model, tokenizer, prompts, cfg, seed, criterion):
    sampling.StopOnStrings = criterion
    start = time.perf_counter()
    ids = sampling.generate_ids(model, tokenizer, prompts, cfg, desc=f"{criterion.__name__} ({cfg.cache})",
                                generator_seed=seed)
    seconds = time.perf_counter() - start
    tokens = sum(len(row) for rows in ids for row in rows)
    return ids, {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    base = models.load_base("synthetic", "default", args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = base.model.to(device)
    questions = base.world.triviaqa_splits()["finetune"]
    prompts = [tasks.qa_fewshot_prompt(q, questions[i + 1 : i + 6]) for i, q in enumerate(questions[: args.prompts])]
    cfg = sampling.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, stop=("\n",),
                                  batch_size=args.batch_size)
    token_ids, static = sampling.StopOnStrings, replace(cfg, cache="static")
    for warm in (cfg, static):  # the static cache's compilation (CUDA) happens here
        timed(model, base.tokenizer, prompts[: args.batch_size], warm, args.seed, token_ids)
    ours, new = timed(model, base.tokenizer, prompts, cfg, args.seed, token_ids)
    fixed, fixed_time = timed(model, base.tokenizer, prompts, static, args.seed, token_ids)
    theirs, old = timed(model, base.tokenizer, prompts, cfg, args.seed, DecodeAll)
    sampling.StopOnStrings = token_ids
    if not ours == theirs == fixed:
        raise SystemExit("error: the backends returned different samples")
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    report = {"device": where, "model": base.key, "token-ids": new, "decode-all": old, "static-cache": fixed_time,
              "speedup": round(old["seconds"] / new["seconds"], 2),
              "static_speedup": round(new["seconds"] / fixed_time["seconds"], 2), "config": vars(args)}
    results.write_json(ROOT / "results" / "benchmarks" / "sampling_throughput.json", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
