"""Model loading (a Hugging Face id or the synthetic world's model) and LoRA adapters via peft."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from common.scales import UsageError

log = logging.getLogger(__name__)

PAPER_BASE_MODEL = "NousResearch/Llama-2-7b-hf"


@dataclass(frozen=True)
class LoraSettings:
    """SPEC.md 0.1: r=16, alpha=16, dropout 0, q_proj and v_proj only (peft's old Llama default)."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    # Token ids whose input embedding and output row train as well: tokens the base model never learnt to read or
    # write (the synthetic scale's \\boxed{} pieces, which pretraining never contains), as new special tokens are
    # trained. Empty: the paper's setting.
    trainable_tokens: tuple[int, ...] = ()


def prepare_tokenizer(tokenizer):
    """Left padding for generation; Llama has no pad token, and the authors' fork padded with the unk id."""
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def load_hf_model(model_id: str, dtype: torch.dtype | None = None, device: str | None = None,
                  revision: str | None = None):
    """A pretrained causal LM and its tokenizer from the Hub (or a local folder).

    A model that cannot be fetched (gated, misspelt, offline) raises a one-line UsageError saying what to do.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype or "auto", revision=revision,
                                                     device_map=device)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"could not load model {model_id!r} ({type(exc).__name__}): check the id, run `hf auth login` and "
            f"accept its licence if it is gated, or point to a local copy") from None
    model.eval()
    return model, prepare_tokenizer(tokenizer)


MICRO_LORA = LoraSettings(r=2, alpha=2)  # the micro preset's tiny adapters (tests only)


@dataclass
class Base:
    """The pretrained base model of a run, its tokenizer, a cache key naming it, and (synthetic scale) its world."""

    model: object
    tokenizer: object
    key: str
    world: object = None


def load_base(scale: str, preset: str, seed: int, model_id: str = PAPER_BASE_MODEL, revision: str | None = None,
              cache_hits: dict | None = None, country_majority: float = 0.0) -> Base:
    """Paper scale: a Hub model (or a local folder) in bf16 on the GPU. Synthetic scale: the world's model (the
    micro preset's tiny world for tests), built or loaded from the cache; its questions come from
    `world.mmlu_splits()` / `world.triviaqa_splits()`; `country_majority` > 0 gives exp05's world."""
    if scale == "synthetic":
        from common import world as synthetic

        w = synthetic.load_or_build_world(synthetic.world_preset("synthetic", preset, country_majority), seed,
                                          cache_hits)
        return Base(model=w.model, tokenizer=w.tokenizer, key=f"world-{w.path.name}", world=w)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # Loaded straight onto the device in its dtype; both and the revision name every cache entry built on it.
    model, tokenizer = load_hf_model(model_id, dtype=dtype, device=device, revision=revision)
    return Base(model=model, tokenizer=tokenizer, key=f"{model_id}@{revision or 'main'}:{str(dtype).split('.')[-1]}")


def with_format_tokens(settings: LoraSettings, tokenizer, formats: Sequence[str]) -> LoraSettings:
    """`settings` that also train the rows of every token the finetuning formats use. At synthetic scale these
    are tokens pretraining never trains as outputs: the build forbids the formats, and the filler sentences that
    carry their words are one-sentence documents whose first token is never predicted (world.py masks it), so
    " I" of "I don't know." has NLL 26 after a TriviaQA prompt and q/v LoRA never learns to write it."""
    ids = {i for text in formats for i in tokenizer(text, add_special_tokens=False).input_ids}
    return replace(settings, trainable_tokens=tuple(sorted(ids)))


def add_lora(model, settings: LoraSettings = LoraSettings(), *, seed: int):
    """Wrap `model` with a fresh trainable LoRA adapter; the base weights stay frozen. The adapter's A matrices are
    drawn from `seed` alone, not the process's global RNG, so the adapter's cache key (which names the seed) fixes
    its starting point."""
    from peft import LoraConfig, TaskType, get_peft_model

    tokens = list(settings.trainable_tokens)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), task_type=TaskType.CAUSAL_LM,
                        trainable_token_indices={"embed_tokens": tokens, "lm_head": tokens} if tokens else None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def adapter_signature(model) -> dict:
    """A model's trainable adapters (rank, scale, dropout, modules, trained token rows), for cache keys: two runs
    that differ only there must not share a cached checkpoint. Empty for a model without adapters."""
    return {name: {"r": c.r, "alpha": c.lora_alpha, "dropout": c.lora_dropout,
                   "target_modules": sorted(c.target_modules), "trainable_tokens": c.trainable_token_indices}
            for name, c in getattr(model, "peft_config", {}).items()}


def merge_lora(peft_model):
    """Fold the adapter into the base weights (the PPO starting point, SPEC.md 0.1)."""
    return peft_model.merge_and_unload()


def merged_copy(peft_model):
    """A copy of the base weights with the adapter folded in, leaving `peft_model` and the base it wraps untouched,
    so that one loaded base serves every variant a run trains (it costs one more copy of the weights)."""
    return copy.deepcopy(peft_model).merge_and_unload()


def load_lora(model, adapter_dir, trainable: bool = False):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
