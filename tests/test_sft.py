import math

import pytest
import torch

from common import cache, models, results, sft, training
from conftest import tiny_llama


def test_with_eos_follows_the_forks_rule():
    assert sft.with_eos("A") == "A </s>"
    assert sft.with_eos("The answer is X. ") == "The answer is X. </s>"
    assert sft.with_eos("A </s>") == "A </s>"


def test_encode_pair_masks_the_prompt(tiny_tokenizer):
    ids, labels = sft.encode_pair(tiny_tokenizer, "Q: Where was Velorin born?\nA:", "Paris", max_length=64)
    tok = tiny_tokenizer.convert_ids_to_tokens(ids)
    # prompt: " Q" : " Where" " was" " Velorin" " born" ? \n A : -> 10 tokens; response: " Paris" " " "</s>"
    assert tok == [" Q", ":", " Where", " was", " Velorin", " born", "?", "\n", "A", ":", " Paris", " ", "</s>"]
    assert labels[:10] == [sft.IGNORE_INDEX] * 10
    assert labels[10:] == ids[10:]
    ids, labels = sft.encode_pair(tiny_tokenizer, "Q: Where was Velorin born?\nA:", "Paris", max_length=11)
    assert len(ids) == len(labels) == 11 and labels[-1] == ids[-1]


def test_collate_pads_right_and_masks_padding():
    batch = sft.collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_response_loss_by_hand():
    # vocab 2; position 0 predicts label[1], position 1 predicts label[2]; label[1] is masked.
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [9.0, 9.0]]])
    labels = torch.tensor([[-100, -100, 1]])
    expected = -math.log(math.exp(0) / (math.exp(2) + math.exp(0)))  # CE of label 1 under logits [2, 0]
    assert sft.response_loss(logits, labels).item() == pytest.approx(expected)
    labels = torch.tensor([[-100, 0, 1]])
    assert sft.response_loss(logits, labels).item() == pytest.approx((math.log(2) + expected) / 2)


def lora_model(tokenizer):
    return models.add_lora(tiny_llama(tokenizer, hidden=16, init_std=0.3), models.LoraSettings(r=4, alpha=8), seed=0)


def adapter_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


PROMPTS = ["Q: Where was Velorin born?\nA:", "Q: Where was Tovtan born?\nA:", "A:"]
RESPONSES = ["Paris", "Rome", "Paris"]


def test_sft_learns_and_only_trains_lora(tiny_tokenizer, tmp_path):
    model = lora_model(tiny_tokenizer)
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    cfg = sft.SFTConfig(lr=1e-2, eta_min=1e-2, batch_size=3, total_steps=40, checkpoint_every=20)
    history = sft.train_sft(model, tiny_tokenizer, PROMPTS, RESPONSES, cfg, tmp_path, seed=0)
    assert history["loss"].iloc[-1] < history["loss"].iloc[0] / 2
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in frozen.items())
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000020", "checkpoint-000040"]


def test_cosine_schedule_constant_when_eta_min_equals_lr(tiny_tokenizer, tmp_path):
    model = lora_model(tiny_tokenizer)
    cfg = sft.SFTConfig(lr=1e-3, eta_min=1e-3, t_max=4, batch_size=1, total_steps=4, checkpoint_every=100)
    assert sft.train_sft(model, tiny_tokenizer, PROMPTS, RESPONSES, cfg, tmp_path, seed=0)["lr"].tolist() == \
        pytest.approx([1e-3] * 4)
    cfg = sft.SFTConfig(lr=1e-3, eta_min=0.0, t_max=4, batch_size=1, total_steps=2, checkpoint_every=100)
    lrs = sft.train_sft(lora_model(tiny_tokenizer), tiny_tokenizer, PROMPTS, RESPONSES, cfg, tmp_path / "b", 0)["lr"]
    assert lrs.tolist() == pytest.approx([1e-3 * (1 + math.cos(math.pi / 4)) / 2, 1e-3 * 0.5])


def test_resume_matches_an_uninterrupted_run(tiny_tokenizer, tmp_path):
    cfg = sft.SFTConfig(lr=1e-2, eta_min=1e-2, batch_size=2, total_steps=6, checkpoint_every=3)
    straight = lora_model(tiny_tokenizer)
    sft.train_sft(straight, tiny_tokenizer, PROMPTS, RESPONSES, cfg, tmp_path / "a", seed=0)

    interrupted = lora_model(tiny_tokenizer)
    half = sft.SFTConfig(**{**cfg.__dict__, "total_steps": 3})
    sft.train_sft(interrupted, tiny_tokenizer, PROMPTS, RESPONSES, half, tmp_path / "b", seed=0)
    resumed = lora_model(tiny_tokenizer)  # a fresh process: same init, then the checkpoint
    history = sft.train_sft(resumed, tiny_tokenizer, PROMPTS, RESPONSES, cfg, tmp_path / "b", seed=0, resume=True)
    assert history["step"].tolist() == [1, 2, 3, 4, 5, 6]
    a, b = adapter_state(straight), adapter_state(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_nan_loss_stops_with_step_and_checkpoint(tiny_tokenizer, tmp_path):
    model = lora_model(tiny_tokenizer)
    cfg = sft.SFTConfig(lr=1e-2, batch_size=1, total_steps=5, checkpoint_every=2)

    def poison(step, path):  # after the step-2 checkpoint, break the model
        with torch.no_grad():
            model.base_model.model.lm_head.weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match=r"step 3; last good checkpoint: .*checkpoint-000002"):
        sft.train_sft(model, tiny_tokenizer, PROMPTS, RESPONSES, cfg, tmp_path, seed=0, on_checkpoint=poison)


def test_mismatched_pairs_are_rejected(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError):
        sft.train_sft(lora_model(tiny_tokenizer), tiny_tokenizer, PROMPTS, RESPONSES[:2], sft.SFTConfig(), tmp_path, 0)


def test_uniform_checkpoint_rule_by_hand():
    # mean validation loss: step 1000 (1.0 + 0.5) / 2 = 0.75, 2000 0.625, 3000 0.625 -> the earliest of the tie
    losses = {"dist1": {1000: 1.0, 2000: 0.5, 3000: 0.75}, "dist2": {1000: 0.5, 2000: 0.75, 3000: 0.5, 4000: 0.0}}
    assert training.uniform_step(losses) == 2000  # 4000 is not a step both methods saved
    with pytest.raises(ValueError, match="share no checkpoint"):
        training.uniform_step({"a": {1: 0.1}, "b": {2: 0.1}})


def test_validation_split_holds_out_a_tenth_only_under_the_uniform_rule():
    train, val = sft.validation_split(50, "uniform", seed=0)
    assert len(val) == 5 and len(train) == 45 and sorted(set(train) | set(val)) == list(range(50))
    train, val = sft.validation_split(50, "authors", seed=0)
    assert train.tolist() == list(range(50)) and len(val) == 0
    with pytest.raises(ValueError, match="checkpoint rule"):
        sft.validation_split(50, "best", seed=0)


def test_checkpoint_losses_score_each_checkpoint_on_the_held_out_pairs(tiny_tokenizer, tmp_path):
    model = lora_model(tiny_tokenizer)
    cfg = sft.SFTConfig(lr=1e-2, eta_min=1e-2, batch_size=3, total_steps=40, checkpoint_every=20)
    sft.train_sft(model, tiny_tokenizer, PROMPTS, RESPONSES, cfg, tmp_path, seed=0)
    losses = sft.checkpoint_losses(model, tiny_tokenizer, tmp_path, PROMPTS[:2], RESPONSES[:2], batch_size=1)
    assert sorted(losses) == [20, 40] and losses[40] < losses[20]
    # the loss at step 20 is the token mean over both pairs, recomputed here with that checkpoint's weights
    training.load_weights(model, tmp_path / "checkpoint-000020")
    batch = sft.collate([sft.encode_pair(tiny_tokenizer, p, r, 64) for p, r in zip(PROMPTS[:2], RESPONSES[:2])],
                        tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert losses[20] == pytest.approx(sft.response_loss(logits, batch["labels"]).item(), rel=1e-5)


def test_finetune_lora_names_the_model_by_its_cache_folder_and_loads_it_the_second_time(tiny_tokenizer, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    base = models.Base(tiny_llama(tiny_tokenizer, hidden=16, init_std=0.3), tiny_tokenizer, key="tiny")
    run = results.Run(tmp_path / "out", "test", "synthetic", "micro", 0)
    cfg = sft.SFTConfig(lr=1e-3, batch_size=2, total_steps=2, t_max=2, eta_min=1e-3, checkpoint_every=2)
    model = sft.finetune_lora(base, models.MICRO_LORA, cfg, PROMPTS, RESPONSES, "x", run, seed=0)
    assert model.adapter_key == sft.adapter_dir(base, models.MICRO_LORA, cfg, PROMPTS, RESPONSES, 0).name
    assert (cache.cache_root() / "sft" / model.adapter_key).is_dir() and not run.cache_hits["sft_x"]
    base.model = model.unload()
    again = sft.finetune_lora(base, models.MICRO_LORA, cfg, PROMPTS, RESPONSES, "x", run, seed=0)
    assert again.adapter_key == model.adapter_key and run.cache_hits["sft_x"]
    base.model = again.unload()
    other = sft.finetune_lora(base, models.MICRO_LORA, cfg, PROMPTS, RESPONSES, "x", run, seed=1)
    assert other.adapter_key != model.adapter_key
