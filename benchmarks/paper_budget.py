"""What the paper presets of exp01-exp06 ask of a GPU: samples, training steps and tokens per figure, and GPU-hours
on H100s as a roofline lower bound (not measured: no GPU was available when this was written; real runs are
slower by whatever `generate` and the training loop lose to Python and memory traffic).

Counts come from the presets (`PRESETS["paper"]` of each run.py) and the dataset sizes in SPEC.md; token lengths
per sequence are the assumptions in `STAGES` (Llama-2 tokens, prompt + response). Time is a roofline estimate from
NVIDIA's published H100 SXM figures (989 TFLOPS dense bf16, 3.35 TB/s HBM3), at the efficiencies below:

- training and scoring: FLOPs / (peak x MFU), with 4N FLOPs per trained token for LoRA (the forward pass and the
  activation gradients; the frozen weights get none), 6N when every weight trains (exp06 round 2), 2N per scored
  token; N = 6.74e9 (Llama-2-7B), 7.62e9 (Qwen2.5-7B), 32.5e9 (Qwen2.5-32B);
- sampling: one pass over the bf16 weights (2N bytes) per decoding step of a batch (the stage's `decode_batch`:
  the preset's sampling batch, PPO's chunk, GRPO's prompts x G), at `DECODE_EFFICIENCY` of the bandwidth, plus the
  prompt's forward pass.

8 GPUs divide every stage by 8 (data parallel; each stage's work splits into independent batches).

    python benchmarks/paper_budget.py    # prints the README's table
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import data  # noqa: E402

N_PARAMS, QWEN_7B, QWEN_32B = 6.74e9, 7.62e9, 32.5e9
PEAK_FLOPS, BANDWIDTH = 989e12, 3.35e12
MFU, DECODE_EFFICIENCY = 0.35, 0.5


@dataclass(frozen=True)
class Stage:
    figure: str
    what: str
    train_steps: int = 0
    batch: int = 0
    samples: int = 0  # generated responses
    new_tokens: int = 0  # per sample (mean)
    scored: int = 0  # sequences scored by a forward pass only
    tokens: int = 0  # per training or scored sequence, or per sample's prompt
    decode_batch: int = 64  # sequences decoded together
    n_params: float = N_PARAMS
    full_finetune: bool = False

    @property
    def train_tokens(self) -> float:
        return self.train_steps * self.batch * self.tokens

    @property
    def hours(self) -> float:
        n = self.n_params
        train = (6 if self.full_finetune else 4) * n * self.train_tokens / (PEAK_FLOPS * MFU)
        score = 2 * n * (self.scored + self.samples) * self.tokens / (PEAK_FLOPS * MFU)
        steps = self.samples / self.decode_batch * self.new_tokens
        decode = steps * 2 * n / (BANDWIDTH * DECODE_EFFICIENCY)
        return (train + score + decode) / 3600


def stages() -> list[Stage]:
    from exp01_mmlu_sft.run import PRESETS as P1
    from exp02_triviaqa_sft.run import PRESETS as P2
    from exp03_rl_abstain.run import PRESETS as P3
    from exp04_reward_models.run import PRESETS as P4
    from exp05_longform_conservative_rm.run import PRESETS as P5
    from exp06_simplefact_grpo.run import PRESETS as P6

    p1, p2, p3, p4, p5, p6 = (p["paper"] for p in (P1, P2, P3, P4, P5, P6))
    mmlu, trivia_train, trivia_test = 14_042 + 1_531, 138_384, 17_944  # SPEC.md 1.1, 1.2

    def ppo_rollouts(cfg):  # each rollout is used once per PPO epoch
        return cfg.total_steps * cfg.batch_size // cfg.ppo_epochs

    m3, t3, e5, g6 = p3.mmlu_ppo, p3.triviaqa_ppo, p5.ppo, p6.grpo
    simplefact_pool = 4 * p6.mix_per_source  # SPEC.md 7.1: four sources, SimpleQA's ~4.3k capping each

    def grpo_run(settings: int, n_params: float, full: bool, what: str) -> Stage:
        """GRPO for `settings` reward settings: every rollout trained on once (one optimizer step per
        minibatch), scored twice more (old and reference log-probs); the evaluations' k samples ride along."""
        rollouts = g6.total_steps * g6.prompts_per_step * g6.group_size
        evaluations = (g6.total_steps // g6.eval_every + 1) * len(data.SIMPLEFACT_SOURCES) * p6.mix_eval_per_source
        return Stage("SimpleFact (exp06)", what, train_steps=settings * rollouts // g6.minibatch_size,
                     batch=g6.minibatch_size, samples=settings * (rollouts + evaluations * p6.eval_samples),
                     new_tokens=200, scored=2 * settings * rollouts, tokens=300,
                     decode_batch=g6.sample_batch_size * g6.group_size, n_params=n_params, full_finetune=full)

    return [
        Stage("all MMLU figures", "unfamiliarity: 5-shot letter scores", scored=mmlu, tokens=700),
        Stage("all TriviaQA figures", "unfamiliarity: 12 few-shot samples per question",
              samples=12 * (trivia_train + trivia_test), new_tokens=8, tokens=150, decode_batch=12 * 16),
        Stage("Fig. 2 MMLU (exp01)", "SFT, 2 distributions", train_steps=2 * p1.sft.total_steps,
              batch=p1.sft.batch_size, scored=4 * 1_531 * 2, tokens=150),
        Stage("Fig. 2 TriviaQA (exp02)", "SFT, 3 distributions; 1 sample per test question",
              train_steps=3 * p2.sft.total_steps, batch=p2.sft.batch_size, samples=3 * trivia_test, new_tokens=10,
              tokens=40),
        Stage("Fig. 3 MMLU (exp03)", "SFT init; PPO, 2 rewards", train_steps=p3.mmlu_sft.total_steps
              + 2 * m3.total_steps, batch=m3.batch_size, samples=2 * ppo_rollouts(m3), new_tokens=4, tokens=150,
              decode_batch=m3.chunk_size),
        Stage("Fig. 3 TriviaQA (exp03)", "SFT init; PPO, 2 rewards", train_steps=p3.triviaqa_sft.total_steps
              + 2 * t3.total_steps, batch=t3.batch_size, samples=2 * ppo_rollouts(t3), new_tokens=10, tokens=40,
              decode_batch=t3.chunk_size),
        Stage("Fig. 4 MMLU (exp04)", "reward models, 2 distributions", train_steps=2 * p4.mmlu_sft.total_steps,
              batch=p4.mmlu_sft.batch_size, scored=2 * 2 * 1_531, tokens=160),
        Stage("Fig. 4 TriviaQA (exp04)", "reward models, 2 distributions; wrong answers sampled",
              train_steps=2 * p4.triviaqa_sft.total_steps, batch=p4.triviaqa_sft.batch_size,
              samples=trivia_train, new_tokens=8, scored=2 * 2 * trivia_test, tokens=50),
        Stage("Figs. 5-8 (exp05)", "SFT bios + plots", train_steps=p5.sft["bio"].total_steps
              + p5.sft["plot"].total_steps, batch=p5.sft["bio"].batch_size, samples=2 * (5_000 + 4_795),
              new_tokens=60, tokens=80, decode_batch=16),
        Stage("Figs. 5-8 (exp05)", "fact classifiers, 2 RMs x 2 tasks", train_steps=4 * p5.rm_sft.total_steps,
              batch=p5.rm_sft.batch_size, samples=20_000, new_tokens=60, tokens=30, decode_batch=16),
        Stage("Figs. 5-8 (exp05)", "decomposer bios + plots", train_steps=sum(
            c.total_steps for c in p5.decomposer_sft.values()), batch=p5.decomposer_sft["bio"].batch_size,
              tokens=150),
        Stage("Figs. 5-8 (exp05)", "PPO, 2 RMs x 2 tasks: rollouts", train_steps=4 * e5.total_steps,
              batch=e5.batch_size, samples=4 * ppo_rollouts(e5), new_tokens=60, tokens=80,
              decode_batch=e5.chunk_size),
        Stage("Figs. 5-8 (exp05)", "PPO rewards: each rollout decomposed, ~4 facts judged",
              samples=4 * ppo_rollouts(e5), new_tokens=100, scored=4 * 4 * ppo_rollouts(e5), tokens=40,
              decode_batch=p5.decompose.batch_size),
        Stage("SimpleFact (exp06)", "filtering: 16 samples per training question (Qwen2.5-7B)",
              samples=p6.filter_samples * simplefact_pool, new_tokens=200, tokens=120,
              decode_batch=p6.sample_batch_size * p6.filter_samples, n_params=QWEN_7B),
        grpo_run(4, QWEN_7B, True, "GRPO round 2 (Qwen2.5-7B, every weight), 4 reward settings"),
        grpo_run(1, QWEN_32B, False, "GRPO round 1 (Qwen2.5-32B, LoRA), setting both"),
    ]


def table() -> str:
    rows = ["| figure | stage | training steps x batch | training tokens | samples | H100-hours, lower bound "
            "| on 8 H100s |", "|---|---|---|---|---|---|---|"]
    total = 0.0
    for s in stages():
        total += s.hours
        steps = f"{s.train_steps:,} x {s.batch}" if s.train_steps else "-"
        tokens = f"{s.train_tokens / 1e6:,.0f}M" if s.train_steps else "-"
        rows.append(f"| {s.figure} | {s.what} | {steps} | {tokens} | {s.samples:,} | {s.hours:,.1f} | "
                    f"{s.hours / 8:,.1f} |")
    rows.append(f"| **all** | | | | | **{total:,.0f}** | **{total / 8:,.0f}** |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
