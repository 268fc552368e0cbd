import math

import pytest
import torch

from common import sampling, tasks, unfamiliarity
from conftest import last_token_model, tiny_llama

LOG = math.log


def letter_model(tokenizer, probs):
    """After ":" the next-token distribution restricted to " A".." D" is `probs`."""
    logits = {(0, f" {L}"): LOG(p) for L, p in zip("ABCD", probs)}
    return last_token_model(tokenizer, {":": 0}, logits)


def test_choice_probs_reads_letter_logits_in_one_pass(tiny_tokenizer):
    model = letter_model(tiny_tokenizer, (0.7, 0.1, 0.15, 0.05))
    prompts = ["Q: Where was Velorin born?\nA:", "A:"]  # different lengths: left padding must not matter
    ids = sampling.next_token_ids(tiny_tokenizer, prompts[0], [" A", " B", " C", " D"])
    probs = sampling.choice_probs(model, tiny_tokenizer, prompts, ids, batch_size=2)
    assert probs.shape == (2, 4)
    assert probs[0].tolist() == pytest.approx([0.7, 0.1, 0.15, 0.05], abs=1e-5)
    assert probs[1].tolist() == pytest.approx([0.7, 0.1, 0.15, 0.05], abs=1e-5)


def test_mmlu_unfamiliarity_is_nll_of_correct_letter(tiny_tokenizer):
    model = letter_model(tiny_tokenizer, (0.7, 0.1, 0.15, 0.05))
    qs = [tasks.MCQuestion("Where was Velorin born?", "x", ("Paris", "Rome", "Paris", "Rome"), a) for a in (0, 1, 3)]
    nll = unfamiliarity.mmlu_unfamiliarity(model, tiny_tokenizer, "letter-model", qs, {"x": qs[:1]})
    assert nll.tolist() == pytest.approx([-LOG(0.7), -LOG(0.1), -LOG(0.05)], abs=1e-4)
    # p(correct) = 0.7 is not > 0.7, so not familiar (the code's rule, p <= 0.7 is unfamiliar)
    assert unfamiliarity.mmlu_is_familiar(nll).tolist() == [False, False, False]
    assert unfamiliarity.mmlu_is_familiar([-LOG(0.71)]).tolist() == [True]


def test_unfamiliarity_scores_are_cached(tiny_tokenizer):
    model = letter_model(tiny_tokenizer, (0.25, 0.25, 0.25, 0.25))
    qs = [tasks.MCQuestion("Where was Velorin born?", "x", ("Paris", "Rome", "Paris", "Rome"), 0)]
    hits: dict = {}
    first = unfamiliarity.mmlu_unfamiliarity(model, tiny_tokenizer, "m", qs, {"x": qs}, cache_hits=hits)
    assert hits == {"unfamiliarity_mmlu-letter": False}
    with torch.no_grad():  # a changed model under the same key must not be recomputed
        model.lm_head.weight.zero_()
    second = unfamiliarity.mmlu_unfamiliarity(model, tiny_tokenizer, "m", qs, {"x": qs}, cache_hits=hits)
    assert hits == {"unfamiliarity_mmlu-letter": True}
    assert second.tolist() == pytest.approx(first.tolist())
    third = unfamiliarity.mmlu_unfamiliarity(model, tiny_tokenizer, "m2", qs, {"x": qs}, cache_hits=hits)
    assert hits["unfamiliarity_mmlu-letter"] is False and third.tolist() == pytest.approx([LOG(4)], abs=1e-4)


def paris_model(tokenizer):
    """Always answers " Paris" after ":", then a newline: a model that knows exactly one answer."""
    return last_token_model(tokenizer, {":": 0, " Paris": 1}, {(0, " Paris"): 30.0, (1, "\n"): 30.0})


def test_triviaqa_unfamiliarity_counts_incorrect_samples(tiny_tokenizer):
    model = paris_model(tiny_tokenizer)
    paris = tasks.QAQuestion("Where was Velorin born?", "q1", "Paris")
    rome = tasks.QAQuestion("Where was Tovtan born?", "q2", "Rome", aliases=("rome",))
    pool = [paris, rome, tasks.QAQuestion("Where was Tovtan born?", "q3", "Oslo")]
    settings = unfamiliarity.QAScoringSettings(n_shots=1, n_samples=12, max_new_tokens=4)
    counts = unfamiliarity.triviaqa_unfamiliarity(model, tiny_tokenizer, "paris", [paris, rome], pool, settings)
    assert counts.tolist() == [0, 12]
    assert unfamiliarity.triviaqa_is_unfamiliar([6, 7, 12]).tolist() == [False, True, True]


def test_generate_returns_k_samples_per_prompt_and_cuts_stops(tiny_tokenizer):
    model = paris_model(tiny_tokenizer)
    cfg = sampling.SamplingConfig(max_new_tokens=5, temperature=1.0, num_samples=3, stop=("\n",), batch_size=2)
    out = sampling.generate(model, tiny_tokenizer, ["Q: Where was Velorin born?\nA:", "A:", "Q:"], cfg)
    assert [len(o) for o in out] == [3, 3, 3]
    assert out[0] == ["Paris"] * 3 and out[1] == ["Paris"] * 3  # the decoder drops the first space, as Llama's does


def test_greedy_generation_and_truncate_at_stop(tiny_tokenizer):
    model = paris_model(tiny_tokenizer)
    cfg = sampling.SamplingConfig(max_new_tokens=3, temperature=0)
    assert sampling.generate(model, tiny_tokenizer, ["A:"], cfg) == [["Paris\n<unk>"]]  # after the newline every logit is 0: argmax is id 0
    assert sampling.truncate_at_stop("abc</s>def\n", ["\n", "</s>"]) == "abc"


def test_continuation_logprobs_sum_over_continuation_tokens(tiny_tokenizer):
    model = paris_model(tiny_tokenizer)
    logp, n = sampling.continuation_logprobs(model, tiny_tokenizer, ["A:", "Q: Where was Velorin born?\nA:"],
                                             [["Paris", "Rome"], ["Paris\n", "Paris"]])
    assert n.tolist() == [[1, 1], [2, 1]]
    rome = -30.0 - LOG(1 + (len(tiny_tokenizer) - 1) * math.exp(-30))
    assert logp.tolist() == [pytest.approx([0.0, rome], abs=1e-3), pytest.approx([0.0, 0.0], abs=1e-6)]


def test_continuation_logprobs_share_the_prompt_cache_yet_equal_whole_sequence_scoring(tiny_tokenizer):
    model = tiny_llama(tiny_tokenizer, hidden=16, init_std=0.5).eval()
    prompts = ["Q: Where was Velorin born?\nA:", "A:", "The answer is"]
    continuations = [["Paris", "Rome\n\nQ:", "I don't know."], ["B", "Paris Rome", "E"], ["Rome", "A B C D", "Paris."]]
    logp, n = sampling.continuation_logprobs(model, tiny_tokenizer, prompts, continuations, batch_size=2)
    for i, prompt in enumerate(prompts):
        p_ids = tiny_tokenizer(prompt, add_special_tokens=False).input_ids
        for j, c in enumerate(continuations[i]):
            c_ids = tiny_tokenizer(c, add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p_ids + c_ids])).logits[0].float()
            whole = torch.log_softmax(logits[len(p_ids) - 1 : -1], -1).gather(-1, torch.tensor(c_ids)[:, None]).sum()
            assert n[i, j] == len(c_ids) and logp[i, j].item() == pytest.approx(whole.item(), abs=1e-4)
    with pytest.raises(ValueError):
        sampling.continuation_logprobs(model, tiny_tokenizer, prompts[:2], [["Paris"], ["Paris", "Rome"]])


def test_next_token_ids_rejects_multi_token_continuations(tiny_tokenizer):
    with pytest.raises(ValueError):
        sampling.next_token_ids(tiny_tokenizer, "A:", [" Paris Rome"])


def test_first_token_ids_must_be_distinct_only_for_choice_scoring(tiny_tokenizer):
    paris, rome = tiny_tokenizer("Paris Rome", add_special_tokens=False).input_ids
    assert sampling.first_token_ids(tiny_tokenizer, ["Paris", "Rome is"]) == [paris, rome]
    with pytest.raises(ValueError, match="distinct"):
        sampling.first_token_ids(tiny_tokenizer, ["Paris", "Paris again"])
    assert sampling.first_token_ids(tiny_tokenizer, ["Paris", "Paris again"], distinct=False) == [paris, paris]


def test_choice_probs_take_token_ids_as_well_as_texts(tiny_tokenizer):
    model = letter_model(tiny_tokenizer, (0.7, 0.1, 0.15, 0.05))
    prompts = ["Q: Where was Velorin born?\nA:", "A:"]
    ids = sampling.next_token_ids(tiny_tokenizer, prompts[0], [" A", " B", " C", " D"])
    as_ids = [tiny_tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    assert torch.allclose(sampling.choice_probs(model, tiny_tokenizer, as_ids, ids),
                          sampling.choice_probs(model, tiny_tokenizer, prompts, ids))


def test_seeded_sampling_repeats_itself_and_leaves_the_global_rng_alone(tiny_tokenizer):

    model = tiny_llama(tiny_tokenizer, init_std=0.5)
    cfg = sampling.SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = sampling.generate_ids(model, tiny_tokenizer, ["Q:", "A:"], cfg, generator_seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert sampling.generate_ids(model, tiny_tokenizer, ["Q:", "A:"], cfg, generator_seed=7) == first
    texts = sampling.generate(model, tiny_tokenizer, ["Q:", "A:"], cfg, generator_seed=7)
    assert texts == [[tiny_tokenizer.decode(r, skip_special_tokens=False) for r in rows] for rows in first]


def test_static_kv_cache_samples_what_the_dynamic_one_does(tiny_tokenizer):
    """The static cache (`SamplingConfig.cache`, compiled by generate on CUDA) on prompts of unequal length, k
    samples each, a stop string: the same tokens as the dynamic cache from the same seed."""

    model = tiny_llama(tiny_tokenizer, init_std=0.5)
    prompts = ["Q: Where was Velorin born?\nA:", "A:", "Q: Where"]
    dynamic = sampling.SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=3, stop=("\n",))
    static = sampling.SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=3, stop=("\n",), cache="static")
    out = sampling.generate_ids(model, tiny_tokenizer, prompts, static, generator_seed=3)
    assert out == sampling.generate_ids(model, tiny_tokenizer, prompts, dynamic, generator_seed=3)
    assert len({len(r) for rows in out for r in rows}) > 1  # some rows stopped early
    with pytest.raises(ValueError, match="unknown KV cache"):
        sampling.SamplingConfig(cache="paged")


@pytest.mark.parametrize("adapter", [False, True])
@pytest.mark.parametrize("temperature, top_p, stop", [(1.0, 1.0, ("\n",)), (0.7, 0.8, ())])
def test_samples_sharing_their_prompt_prefill_are_the_ones_generate_draws(tiny_tokenizer, monkeypatch, adapter,
                                                                           temperature, top_p, stop):
    """k samples per prompt from one prefill per prompt: token for token what transformers' generate (which
    prefills every copy) draws from the same seed, on prompts of unequal length, with rows stopping early, with
    the warpers, and through a peft adapter; and the global RNG is left alone."""
    from common import models

    model = tiny_llama(tiny_tokenizer, init_std=0.5)
    if adapter:
        model = models.add_lora(model, models.LoraSettings(r=2, alpha=4, target_modules=("q_proj", "v_proj")), seed=1)
    prompts = ["Q: Where was Velorin born?\nA:", "A:", "Q: Where", "The answer is"]
    cfg = sampling.SamplingConfig(max_new_tokens=7, temperature=temperature, top_p=top_p, num_samples=5, stop=stop,
                                  batch_size=3)
    calls, shared_prefill = [], sampling.sample_shared_prefill
    monkeypatch.setattr(sampling, "sample_shared_prefill", lambda *a: calls.append(1) or shared_prefill(*a))
    before = torch.get_rng_state()
    shared = sampling.generate_ids(model, tiny_tokenizer, prompts, cfg, generator_seed=11)
    assert torch.equal(torch.get_rng_state(), before)
    assert len(calls) == 2  # one per batch
    expected = []
    with torch.random.fork_rng():
        torch.manual_seed(11)
        for start in range(0, len(prompts), cfg.batch_size):
            enc = sampling._encode(tiny_tokenizer, prompts[start : start + cfg.batch_size], torch.device("cpu"))
            width = enc["input_ids"].shape[1]
            stopping = [sampling.StopOnStrings(tiny_tokenizer, stop, width)] if stop else None
            seqs = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=temperature,
                                  top_p=top_p, top_k=0, num_return_sequences=cfg.num_samples,
                                  pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                                  stopping_criteria=stopping)
            rows = sampling._strip_padding(seqs[:, width:], tiny_tokenizer)
            k = cfg.num_samples
            expected.extend(rows[i * k : (i + 1) * k] for i in range(len(rows) // k))
    assert shared == expected
    assert len({len(r) for rows in shared for r in rows}) > 1  # some rows stopped early
    assert len({tuple(r) for r in shared[0]}) > 1  # the samples of one prompt differ


def metaspace_tokenizer():
    """A small BPE tokenizer with Llama's sentencepiece-style spaces ("▁"), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    texts = ["Q: Where was Velorin born?\nA: Paris\n\nQ: Where was Tovtan born?\nA: Rome. Answer: B"] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="<unk>")


@pytest.mark.parametrize("which", ["word", "metaspace"])
@pytest.mark.parametrize("stop, most_rows_skipped", [(("\nQ:", "."), True), (("\nQ:", " Answer", ".", ": "), False)])
def test_stop_strings_on_token_ids_stop_where_decoding_everything_does(tiny_tokenizer, which, stop,
                                                                        most_rows_skipped):
    """Every row stops at the step where decoding all its new tokens first shows a stop string. With a space in a
    stop string every word-level token can complete it, so only the other case must skip most rows."""
    tokenizer = tiny_tokenizer if which == "word" else metaspace_tokenizer()
    ordinary = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    ids = torch.tensor(ordinary)[torch.randint(len(ordinary), (256, 14), generator=torch.Generator().manual_seed(0))]
    prompt_len = 3
    criterion = sampling.StopOnStrings(tokenizer, stop, prompt_len)
    decoded_rows = 0
    batch_decode = tokenizer.batch_decode

    def counting(rows, **kw):
        nonlocal decoded_rows
        decoded_rows += len(rows)
        return batch_decode(rows, **kw)

    tokenizer.batch_decode = counting
    first_stop = {}
    for t in range(prompt_len + 1, ids.shape[1] + 1):
        for row in torch.nonzero(criterion(ids[:, :t], None)).flatten().tolist():
            first_stop.setdefault(row, t)
    tokenizer.batch_decode = batch_decode
    expected = {}
    for row in range(len(ids)):
        for t in range(prompt_len + 1, ids.shape[1] + 1):
            if any(s in tokenizer.decode(ids[row, prompt_len:t], skip_special_tokens=True) for s in stop):
                expected[row] = t
                break
    assert first_stop == expected and 20 < len(expected) < 256  # some rows stop, at the same step as before
    if most_rows_skipped:
        assert decoded_rows < 0.5 * 256 * (ids.shape[1] - prompt_len)
