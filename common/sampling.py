"""Batched sampling and scoring with a causal LM.

Everything is batched with left padding: generation reuses the KV cache, and k samples of a prompt share its
prefill (`sample_shared_prefill`); choice scoring and continuation likelihoods are one forward pass per batch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, LogitsProcessorList, StoppingCriteria, TemperatureLogitsWarper, TopPLogitsWarper

from common import training


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 40
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    num_samples: int = 1
    stop: tuple[str, ...] = ()
    batch_size: int = 32  # prompts per batch (each expands to num_samples sequences)
    # The KV cache: "dynamic" grows with each step; "static" is allocated once for prompt + max_new_tokens, which
    # transformers' generate then runs through torch.compile on CUDA (eager on CPU, where it is only tested).
    cache: str = "dynamic"

    def __post_init__(self):
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"unknown KV cache {self.cache!r}; expected dynamic or static")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _encode(tokenizer, texts: Sequence[str] | Sequence[Sequence[int]], device) -> dict[str, torch.Tensor]:
    """Left-padded input ids and attention mask for texts or for already tokenized prompts. No BOS (SPEC.md 0.1):
    texts are tokenized without special tokens."""
    if texts and not isinstance(texts[0], str):
        width = max(len(t) for t in texts)
        ids = torch.full((len(texts), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(texts), width), dtype=torch.long)
        for i, t in enumerate(texts):
            ids[i, width - len(t) :] = torch.tensor(list(t), dtype=torch.long)
            attention[i, width - len(t) :] = 1
        return {"input_ids": ids.to(device), "attention_mask": attention.to(device)}
    tokenizer.padding_side = "left"
    enc = tokenizer(list(texts), add_special_tokens=False, padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut a generation just before the earliest stop string (the stop string itself is dropped)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: Sequence[str], cfg: SamplingConfig, desc: str = "generate",
                 generator_seed: int | None = None) -> list[list[list[int]]]:
    """For each prompt, `cfg.num_samples` continuations as token ids, each ending at its EOS (kept) or where
    generation stopped (a stop string, `max_new_tokens`). Sampling with `generator_seed` draws from its own
    random stream and leaves the caller's global torch RNG as it found it."""
    device = _device(model)
    was_training = model.training
    model.eval()
    out: list[list[list[int]]] = []
    greedy = cfg.temperature == 0
    gen_kwargs = dict(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=not greedy,
        num_return_sequences=cfg.num_samples,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
        synced_gpus=training.is_sharded(model),  # every process's layers take part in every forward pass
    )
    if cfg.cache == "static":
        gen_kwargs["cache_implementation"] = "static"
    if not greedy:
        gen_kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
    # `generate` keeps what the shared prefill does not do: greedy decoding, the compiled static cache and the
    # lockstep forward passes of a sharded model
    shared = not greedy and cfg.num_samples > 1 and cfg.cache == "dynamic" and not gen_kwargs["synced_gpus"]
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], enabled=generator_seed is not None):
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        for start in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, leave=False,
                          disable=len(prompts) <= cfg.batch_size):
            batch = prompts[start : start + cfg.batch_size]
            enc = _encode(tokenizer, batch, device)
            stopping = [StopOnStrings(tokenizer, cfg.stop, enc["input_ids"].shape[1])] if cfg.stop else None
            if shared:
                seqs = sample_shared_prefill(model, enc, cfg, tokenizer, stopping)
            else:
                seqs = model.generate(**enc, **gen_kwargs, stopping_criteria=stopping)
            rows = _strip_padding(seqs[:, enc["input_ids"].shape[1] :], tokenizer)
            out.extend(rows[i * cfg.num_samples : (i + 1) * cfg.num_samples] for i in range(len(batch)))
    model.train(was_training)
    return out


def sample_shared_prefill(model, enc: dict[str, torch.Tensor], cfg: SamplingConfig, tokenizer,
                          stopping: Sequence[StoppingCriteria] | None) -> torch.Tensor:
    """`cfg.num_samples` samples of every prompt in `enc`, as transformers' `generate` draws them, but with each
    prompt's prefill run once and its KV cache copied to its samples' rows. `generate` prefills every copy: 12
    few-shot TriviaQA samples (prompts of 87 tokens, 6 new tokens) took 3.4x as long that way. What `generate`
    does is kept: the same warpers, one multinomial draw per step for every row, finished rows padded, the same
    stops and position ids, so the same random stream gives the same tokens (bit-identical on CPU: tested, and
    checked on every experiment's sampling). Returns the prompts' rows, each repeated `num_samples` times, with the
    new tokens appended."""
    n, pad, eos = cfg.num_samples, tokenizer.pad_token_id, tokenizer.eos_token_id
    warpers = LogitsProcessorList(([TemperatureLogitsWarper(cfg.temperature)] if cfg.temperature != 1.0 else [])
                                  + ([TopPLogitsWarper(cfg.top_p)] if cfg.top_p < 1.0 else []))
    ids, attention = enc["input_ids"], enc["attention_mask"]
    positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    cache.batch_repeat_interleave(n)
    ids, attention, logits = (t.repeat_interleave(n, 0) for t in (ids, attention, logits))
    position = positions[:, -1:].repeat_interleave(n, 0)
    unfinished = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
    for step in range(cfg.max_new_tokens):
        probs = torch.softmax(warpers(ids, logits.float()), dim=-1)
        token = torch.multinomial(probs, num_samples=1)[:, 0].where(unfinished, pad)
        ids = torch.cat([ids, token[:, None]], dim=1)
        unfinished &= token != eos
        for criterion in stopping or ():
            unfinished &= ~criterion(ids, None)
        if step + 1 == cfg.max_new_tokens or not unfinished.any():
            break
        attention = torch.cat([attention, attention.new_ones((len(ids), 1))], dim=1)
        position = position + 1
        logits = model(input_ids=token[:, None], attention_mask=attention, position_ids=position,
                       past_key_values=cache, use_cache=True).logits[:, -1]
    return ids


def generate(model, tokenizer, prompts: Sequence[str], cfg: SamplingConfig, desc: str = "generate",
             generator_seed: int | None = None) -> list[list[str]]:
    """Return, for each prompt, `cfg.num_samples` decoded continuations (special tokens kept, stops cut)."""
    ids = generate_ids(model, tokenizer, prompts, cfg, desc, generator_seed)
    return [[truncate_at_stop(tokenizer.decode(row, skip_special_tokens=False), cfg.stop) for row in rows]
            for rows in ids]


class StopOnStrings(StoppingCriteria):
    """Marks a sequence finished once its generated text contains a stop string.

    transformers' own `stop_strings` needs a sentencepiece/BPE-style vocabulary; decoding works with any tokenizer,
    the synthetic word-level one included. Only rows whose newest token can complete a stop string
    (`stop_token_mask`) are decoded, and only their last few tokens: a string of n characters spans at most n tokens
    that each add one, so a window of n + 2 also keeps the space a sentencepiece decode drops at its start.
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, tuple(stop), prompt_len
        self.may_stop = stop_token_mask(tokenizer, self.stop)
        self.window = max(len(s) for s in self.stop) + 2

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        if input_ids.shape[1] > self.prompt_len:
            rows = torch.nonzero(self.may_stop[input_ids[:, -1].cpu()]).flatten().tolist()
            start = max(self.prompt_len, input_ids.shape[1] - self.window)
            tails = self.tokenizer.batch_decode(input_ids[rows, start:], skip_special_tokens=True)
            done[rows] = torch.tensor([any(s in t for s in self.stop) for t in tails], dtype=torch.bool)
        return done.to(input_ids.device)


@functools.lru_cache(maxsize=8)
def stop_token_mask(tokenizer, stop: tuple[str, ...]) -> torch.Tensor:
    """Per vocabulary id, whether the token can complete a stop string: the text it adds after another token shares
    a character with one (read in context, since a sentencepiece token's leading space vanishes on its own), or is
    not plain text (a partial UTF-8 byte). Special tokens never do: decoding skips them."""
    special = set(tokenizer.all_special_ids)
    ref = next(i for i in range(len(tokenizer)) if i not in special and tokenizer.decode([i]).isalnum())
    prefix = tokenizer.decode([ref])
    texts = tokenizer.batch_decode([[ref, i] for i in range(len(tokenizer))], skip_special_tokens=True)
    chars = set("".join(stop))
    mask = torch.tensor([not t.startswith(prefix) or "\ufffd" in t or bool(chars.intersection(t[len(prefix):]))
                         for t in texts], dtype=torch.bool)
    mask[list(special)] = False  # also the padding of finished rows
    return mask


def _strip_padding(new_tokens: torch.Tensor, tokenizer) -> list[list[int]]:
    """Drop everything after the first EOS (finished sequences are padded after it)."""
    rows = []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for row in new_tokens.tolist():
        kept = []
        for t in row:
            if t == pad and pad != eos:
                break
            kept.append(t)
            if t == eos:
                break
        rows.append(kept)
    return rows


@torch.no_grad()
def choice_probs(model, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], choice_token_ids: Sequence[int],
                 batch_size: int = 32, desc: str = "score choices") -> torch.Tensor:
    """Softmax over `choice_token_ids` of the next-token logits at each prompt's last position (prompts as texts
    or as token ids).

    One forward pass per batch; with left padding the last position is the same column for every row.
    Returns a float tensor [len(prompts), len(choice_token_ids)] on the CPU.
    """
    device = _device(model)
    ids = torch.tensor(list(choice_token_ids), device=device)
    rows = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False,
                      disable=len(prompts) <= batch_size):
        enc = _encode(tokenizer, prompts[start : start + batch_size], device)
        logits = model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1, :]
        rows.append(torch.softmax(logits.float()[:, ids], dim=-1).cpu())
    return torch.cat(rows) if rows else torch.empty(0, len(ids))


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prompts: Sequence[str], continuations: Sequence[Sequence[str]],
                          batch_size: int = 64, desc: str = "score continuations") -> tuple[torch.Tensor, torch.Tensor]:
    """For each prompt and each of its k continuations: the sum of the continuation's log-probabilities given the
    prompt, and its token count; [n_prompts, k] each.

    Prompt and continuation are tokenized separately and concatenated (as the SFT pairs are), so the
    continuation's tokens are exactly those scored. Each prompt runs once and its KV cache serves its k
    continuations (4-5 answers of a few tokens after a 40-token question: about 4x fewer tokens than scoring each
    pair whole; the same sums to float precision, tested).
    """
    k = len(continuations[0]) if len(continuations) else 0
    if any(len(c) != k for c in continuations) or any(not c for cs in continuations for c in cs):
        raise ValueError("continuation_logprobs needs the same number of non-empty continuations for every prompt")
    device = _device(model)
    pad = tokenizer.pad_token_id
    sums, counts = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False,
                      disable=len(prompts) <= batch_size):
        enc = _encode(tokenizer, prompts[start : start + batch_size], device)
        out = model(**enc, use_cache=True, logits_to_keep=1)
        c_ids = tokenizer([c for cs in continuations[start : start + batch_size] for c in cs],
                          add_special_tokens=False).input_ids
        width = max(len(c) for c in c_ids)
        conts = torch.full((len(c_ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(c_ids), width), dtype=torch.long)
        for i, c in enumerate(c_ids):
            conts[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), 1
        conts, mask = conts.to(device), mask.to(device)
        first = torch.log_softmax(out.logits[:, -1].float(), -1).repeat_interleave(k, 0)
        logp = first.gather(-1, conts[:, :1])[:, 0]
        if width > 1:  # the continuations' own tokens, right-padded after the shared prompt
            cache = out.past_key_values
            cache.batch_repeat_interleave(k)
            attention = torch.cat([enc["attention_mask"].repeat_interleave(k, 0), mask[:, :-1]], dim=1)
            logits = model(input_ids=conts[:, :-1], attention_mask=attention, past_key_values=cache,
                           use_cache=True).logits.float()
            rest = torch.log_softmax(logits, -1).gather(-1, conts[:, 1:, None])[..., 0]
            logp = logp + (rest * mask[:, 1:]).sum(-1)
        sums.append(logp.view(-1, k).cpu())
        counts.append(mask.sum(-1).view(-1, k).cpu())
    return torch.cat(sums), torch.cat(counts)


def first_token_ids(tokenizer, responses: Sequence[str], distinct: bool = True) -> list[int]:
    """The first token of each response tokenized on its own, as SFT targets are (SPEC.md 0.2): the token a
    finetuned model emits first, e.g. Llama's "▁A" (id 319) after ", Answer: ". Choice scoring needs them
    `distinct`; a set of allowed first tokens does not."""
    ids = [tokenizer(r, add_special_tokens=False).input_ids[0] for r in responses]
    if distinct and len(set(ids)) != len(ids):
        raise ValueError(f"responses {list(responses)} do not start with distinct tokens")
    return ids


def next_token_ids(tokenizer, prompt: str, continuations: Sequence[str]) -> list[int]:
    """The token each continuation adds after `prompt`, tokenized in context.

    Tokenizers disagree on spaces (Llama reads "Answer: A" as [..., "▁A"], the synthetic tokenizer as
    [..., " A"]), so answer tokens are found by tokenizing the real prompt with each continuation appended.
    """
    base = tokenizer(prompt, add_special_tokens=False).input_ids
    ids = []
    for c in continuations:
        full = tokenizer(prompt + c, add_special_tokens=False).input_ids
        if len(full) != len(base) + 1 or full[: len(base)] != base:
            raise ValueError(f"{c!r} after {prompt[-20:]!r} is not exactly one new token for this tokenizer")
        ids.append(full[-1])
    return ids
