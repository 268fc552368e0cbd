"""Scales, presets and the command-line flags every run.py shares (DESIGN.md "Scales")."""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from common.results import REPO_ROOT

SCALES = ("auto", "synthetic", "small", "paper")
PRESETS = ("default", "micro")
log = logging.getLogger(__name__)


class UsageError(SystemExit):
    """An error the user caused: printed as one line (`error: ...`), exit status 1, no traceback."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def preset_key(scale: str, preset: str) -> str:
    """Which entry of a module's PRESETS a run uses: the micro preset overrides the scale (tests run it on CPU)."""
    return "micro" if preset == "micro" else scale


@dataclass(frozen=True)
class RunArgs:
    experiment: str
    scale: str
    scale_reason: str
    preset: str
    seed: int
    out: Path
    resume: bool

    @property
    def preset_key(self) -> str:
        return preset_key(self.scale, self.preset)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_scale(requested: str) -> tuple[str, str]:
    """`auto` -> `paper` with CUDA, else `synthetic`. Returns (scale, why)."""
    if requested not in SCALES:
        raise UsageError(f"unknown scale {requested!r}; choose one of {', '.join(SCALES)}")
    if requested == "small":
        raise UsageError("scale 'small' (SmolLM2-135M on real facts) is not built yet; use --scale synthetic")
    if requested != "auto":
        return requested, "requested"
    return ("paper", "auto: CUDA is available") if cuda_available() else ("synthetic", "auto: no CUDA")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", default="auto", choices=SCALES,
                        help="auto = paper with CUDA, else synthetic (default: auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: results/<experiment>/<scale>/seed<N>)")
    parser.add_argument("--resume", action="store_true", help="resume training from the last checkpoint")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="let --scale paper run without CUDA (tests and debugging only)")
    parser.add_argument("--preset", default="default", choices=PRESETS, help=argparse.SUPPRESS)


def add_checkpoint_arg(parser: argparse.ArgumentParser) -> None:
    """The checkpoint rule of the experiments that compare SFT-trained models (common.sft.CHECKPOINT_RULES)."""
    parser.add_argument("--checkpoint", default="authors", choices=("authors", "uniform"),
                        help="authors: the preset's step (the authors' figure step at paper scale); uniform: one step "
                             "for the compared models, the lowest mean loss on a validation split held out of the "
                             "finetuning pool (SPEC.md section 8)")


def parse_run_args(experiment: str, parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, RunArgs]:
    """Parse flags, resolve the scale, announce it on the first line and set up logging."""
    args = parser.parse_args(argv)
    scale, why = resolve_scale(args.scale)
    if scale == "paper" and not args.allow_cpu and not cuda_available():
        raise UsageError("--scale paper needs a CUDA GPU: a 7B model in fp32 on a CPU would take days; use --scale "
                         "synthetic, or pass --allow-cpu to run anyway")
    print(f"scale: {scale} ({why}); preset: {args.preset}; seed: {args.seed}", flush=True)
    setup_logging()
    folder = scale if args.preset == "default" else f"{scale}-{args.preset}"
    out = args.out or REPO_ROOT / "results" / experiment / folder / f"seed{args.seed}"
    return args, RunArgs(experiment=experiment, scale=scale, scale_reason=why, preset=args.preset,
                         seed=args.seed, out=Path(out), resume=args.resume)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
