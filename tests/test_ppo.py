import math
from dataclasses import replace

import pandas as pd
import pytest
import torch

from common import models, results
from common.rl import ppo, rollouts
from conftest import tiny_llama

T = torch.tensor


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, T(expected), atol=atol, rtol=0)


def test_kl_penalty_on_every_token_and_score_on_the_last():
    logprobs = T([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    ref = T([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    rewards = ppo.kl_penalized_rewards(T([1.0, -2.0]), logprobs, ref, mask, beta=0.1)
    # row 0: -0.1 * 0.5, then -0.1 * (-1) + 1; row 1: a one-token response gets only its score
    close(rewards, [[-0.05, 1.1, 0.0], [-2.0, 0.0, 0.0]])


def test_gae_by_hand():
    rewards, values, mask = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.2, 0.4]]), T([[1.0, 1.0, 1.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # deltas: 1 - 0.4 = 0.6; 0.4 - 0.2 = 0.2; 0.2 - 0.5 = -0.3; advantages are their suffix sums
    close(adv, [[0.5, 0.8, 0.6]])
    close(ret, [[1.0, 1.0, 1.0]])
    adv, _ = ppo.gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # deltas: 0.6; 0.5 * 0.4 - 0.2 = 0; 0.5 * 0.2 - 0.5 = -0.4; A_t = delta_t + 0.25 * A_{t+1}
    close(adv, [[-0.3625, 0.15, 0.6]])


def test_gae_ignores_values_and_rewards_past_the_response():
    adv, ret = ppo.gae(T([[0.0, 2.0, 0.0]]), T([[1.0, 1.0, 9.0]]), T([[1.0, 1.0, 0.0]]), 1.0, 1.0)
    close(adv, [[1.0, 1.0, 0.0]])
    close(ret, [[2.0, 2.0, 0.0]])


def test_whiten_uses_only_response_tokens():
    out = ppo.whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1.0, 1.0, 0.0]]))
    s = math.sqrt(2 / 3)  # masked mean 2, variance 2/3
    close(out, [[-1 / s, 0.0, 1 / s, 0.0]], atol=1e-5)


def test_clipped_surrogate_and_value_loss_by_hand():
    old = T([[0.0, 0.0, 0.0]])
    logprobs = T([[math.log(1.5), math.log(0.5), math.log(0.5)]])
    adv = T([[1.0, 1.0, -1.0]])
    mask = T([[1.0, 1.0, 1.0]])
    pg, vf, stats = ppo.ppo_losses(logprobs, T([[1.0, 2.0, 3.0]]), old, adv, T([[0.0, 2.0, 5.0]]), mask, 0.2)
    # per token max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2 (clipped); max(-0.5, -0.8) = -0.5; max(0.5, 0.8) = 0.8
    assert pg.item() == pytest.approx((-1.2 - 0.5 + 0.8) / 3)
    assert stats["clipfrac"] == pytest.approx(2 / 3)
    assert vf.item() == pytest.approx(0.5 * (1 + 0 + 4) / 3)


def test_kl0_quirk_gives_gradient_only_to_positive_advantages():
    logprobs = T([[-0.5, -0.5]], requires_grad=True)
    const = torch.full((1, 2), ppo.QUIRK_LOGPROB)
    pg, _, stats = ppo.ppo_losses(logprobs, T([[0.0, 0.0]]), const, T([[1.0, -1.0]]), T([[0.0, 0.0]]),
                                  T([[1.0, 1.0]]), 0.005)
    pg.backward()
    ratio = math.exp(-0.5 - 1.0)  # < 1 - 0.005: the positive token keeps -A * r, the negative one a constant
    close(logprobs.grad, [[-ratio / 2, 0.0]])
    assert stats["clipfrac"] == pytest.approx(0.5)


def test_collate_aligns_responses_at_one_column_and_counts_positions_from_real_tokens():
    batch = rollouts.collate([rollouts.Rollout([5, 6], [7]), rollouts.Rollout([8], [9, 10, 11])], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 1], [1, 8, 9, 10, 11]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 2], [0, 0, 1, 2, 3]]
    assert batch["mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["prompt_width"] == 2


def test_value_head_sees_a_detached_hidden_state():
    head = ppo.ValueHead(4)
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    head(hidden).sum().backward()
    assert hidden.grad is None and head.mlp[0].weight.grad is not None
    assert head.mlp[0].weight.shape == (8, 4) and head.mlp[2].weight.shape == (1, 8)


PROMPTS = ["Q: Where was Velorin born?\nA:", "Q: Where was Tovtan born?\nA:", "A:"]


def _rewarding_paris(tokenizer, cfg, out_dir, evaluate=None, resume=False, prompts=PROMPTS[:2]):
    policy = models.add_lora(tiny_llama(tokenizer, hidden=16), models.LoraSettings(r=4, alpha=8), seed=0)
    seen = []

    def score(idx, texts):
        seen.extend(idx)
        return [2.0 if t.startswith(" Paris") else -1.0 for t in texts]

    head, curves = ppo.train_ppo(policy, tokenizer, prompts, score, cfg, out_dir, seed=0, resume=resume,
                                 evaluate=evaluate)
    return policy, head, curves, seen


def test_ppo_runs_warms_up_the_value_head_and_caches_its_result(tiny_tokenizer, tmp_path):
    cfg = ppo.PPOConfig(lr=1e-2, eta_min=1e-2, total_steps=6, num_rollouts=4, chunk_size=2, batch_size=2,
                        ppo_epochs=1, vf_only_steps=2, max_new_tokens=3, checkpoint_every=2, eval_every=3,
                        init_kl_coef=0.1)
    policy, head, curves, seen = _rewarding_paris(tiny_tokenizer, cfg, tmp_path,
                                                  evaluate=lambda step: {"eval_step": step})
    assert curves.step.tolist() == list(range(0, 7))  # step 0 is the starting point's evaluation
    assert curves.eval_step.dropna().tolist() == [0, 3, 6]
    assert set(curves.columns) >= {"mean_score", "kl", "clipfrac", "vf_loss", "pg_loss"}
    assert sorted(set(seen)) == [0, 1] and len(seen) == 12  # 3 rounds of 4 rollouts, 2 prompts shuffled
    # a finished run in the folder is loaded, not retrained: no new rollouts, the same value head
    policy2, head2, curves2, seen2 = _rewarding_paris(tiny_tokenizer, cfg, tmp_path)
    assert seen2 == [] and curves2.step.tolist() == curves.step.tolist()
    for a, b in zip(head.parameters(), head2.parameters()):
        assert torch.equal(a, b)


def test_value_only_warm_up_leaves_the_policy_untouched(tiny_tokenizer, tmp_path):
    cfg = ppo.PPOConfig(lr=1e-2, eta_min=1e-2, total_steps=2, num_rollouts=4, chunk_size=2, batch_size=2,
                        ppo_epochs=1, vf_only_steps=2, max_new_tokens=3)
    policy = models.add_lora(tiny_llama(tiny_tokenizer, hidden=16), models.LoraSettings(r=4, alpha=8), seed=0)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter non-trivial so a step would move it
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    before = {n: p.clone() for n, p in policy.named_parameters() if p.requires_grad}
    ppo.train_ppo(policy, tiny_tokenizer, ["Q: Where was Velorin born?\nA:"], lambda i, t: [1.0] * len(t), cfg,
                  tmp_path, seed=0)
    for n, p in policy.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n


def test_the_cache_key_names_the_policys_adapter(tiny_tokenizer, tmp_path, monkeypatch):
    """Two PPO runs from the same starting point whose adapters differ only in their modules must not share a cached
    checkpoint (the second would load the first's finished run as its own, or resume it with the wrong shapes)."""
    monkeypatch.setenv("UNFAMILIAR_CACHE", str(tmp_path / "cache"))
    folders = []

    def record_folder(policy, tokenizer, prompts, score, cfg, out_dir, seed, **kwargs):
        folders.append(out_dir)
        return None, pd.DataFrame({"step": [0]})

    monkeypatch.setattr(ppo, "train_ppo", record_folder)
    run = results.Run(tmp_path / "out", "exp", "micro", "default", 0)
    cfg = ppo.PPOConfig(total_steps=2, num_rollouts=2, chunk_size=2, batch_size=2)
    for modules in (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("v_proj", "q_proj")):
        policy = models.add_lora(tiny_llama(tiny_tokenizer, hidden=16),
                                 models.LoraSettings(r=4, alpha=8, target_modules=modules), seed=0)
        ppo.train_cached(policy, tiny_tokenizer, PROMPTS[:2], lambda i, t: [0.0] * len(t), cfg, "p", run, seed=0,
                         init_key="start")
    assert folders[0] != folders[1] and folders[0] == folders[2]


def test_reward_tables():
    from common.rl.rewards import reward

    assert [reward(c, "first", "mmlu") for c in ("correct", "incorrect", "idk", "malformed")] == [2, -3, -3, -6]
    assert [reward(c, "second", "triviaqa") for c in ("correct", "incorrect", "idk", "malformed")] == [2, -3, 0, -3]
    # a blind guess among four options: better than abstaining under reward first, worse under reward second
    guess = 0.25 * reward("correct", "first", "mmlu") + 0.75 * reward("incorrect", "first", "mmlu")
    assert guess == -1.75 and reward("idk", "first", "mmlu") < guess < reward("idk", "second", "mmlu")


ROUNDS = ppo.PPOConfig(lr=1e-2, eta_min=1e-2, total_steps=12, num_rollouts=5, chunk_size=5, batch_size=2,
                       ppo_epochs=2, vf_only_steps=1, max_new_tokens=3, checkpoint_every=6, eval_every=6,
                       init_kl_coef=0.1)


def test_each_ppo_epoch_is_one_permutation_of_the_store(tiny_tokenizer, tmp_path, monkeypatch):
    used = []
    real_step = ppo.ppo_step

    def recording_step(policy, value_head, optimizer, tokenizer, minibatch, *args):
        used.append([id(r) for r in minibatch])
        return real_step(policy, value_head, optimizer, tokenizer, minibatch, *args)

    monkeypatch.setattr(ppo, "ppo_step", recording_step)
    _rewarding_paris(tiny_tokenizer, ROUNDS, tmp_path, prompts=PROMPTS)
    # a store of 5 rollouts in minibatches of 2 gives 2 + 2 + 1 per epoch: 6 steps per round of 2 epochs
    assert [len(m) for m in used] == [2, 2, 1] * 4
    for round_ in range(2):
        for epoch in range(2):
            ids = [i for m in used[6 * round_ + 3 * epoch : 6 * round_ + 3 * epoch + 3] for i in m]
            assert len(set(ids)) == 5  # every rollout exactly once per epoch


def test_fresh_rollouts_have_ratio_one_and_no_kl(tiny_tokenizer, tmp_path):
    cfg = ppo.PPOConfig(lr=1e-2, eta_min=1e-2, total_steps=1, num_rollouts=6, chunk_size=3, batch_size=4,
                        ppo_epochs=1, vf_only_steps=0, max_new_tokens=4, init_kl_coef=0.1)
    _, _, curves, _ = _rewarding_paris(tiny_tokenizer, cfg, tmp_path, prompts=PROMPTS)
    # the minibatch mixes rollouts of two collection chunks, with other padding than either
    first = curves.iloc[0]
    assert first.ratio == pytest.approx(1.0, abs=1e-6) and first.clipfrac == 0.0
    assert first.kl == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA adapter is the reference


def test_no_reference_pass_at_kl_coefficient_zero(tiny_tokenizer, tmp_path, monkeypatch):
    from peft import PeftModel

    def no_reference(self):
        raise AssertionError("reference forward pass at KL coefficient 0")

    monkeypatch.setattr(PeftModel, "disable_adapter", no_reference)
    cfg = ppo.PPOConfig(lr=1e-2, eta_min=1e-2, total_steps=2, num_rollouts=4, chunk_size=2, batch_size=2,
                        ppo_epochs=1, vf_only_steps=0, max_new_tokens=3, init_kl_coef=0.0)
    _, _, curves, _ = _rewarding_paris(tiny_tokenizer, cfg, tmp_path)
    assert (curves.kl == 0).all()
    with pytest.raises(AssertionError, match="reference forward pass"):
        _rewarding_paris(tiny_tokenizer, replace(cfg, init_kl_coef=0.1), tmp_path / "kl")


def test_evaluations_do_not_change_the_rollouts(tiny_tokenizer, tmp_path):
    from common import sampling

    sampler = tiny_llama(tiny_tokenizer, hidden=16, seed=5)

    def evaluate(step):  # seeded sampling, as the curve evaluations do
        sampling.generate(sampler, tiny_tokenizer, ["A:"], sampling.SamplingConfig(max_new_tokens=2),
                          generator_seed=123)
        return {}

    plain = _rewarding_paris(tiny_tokenizer, ROUNDS, tmp_path / "plain")[2]
    evaluated = _rewarding_paris(tiny_tokenizer, ROUNDS, tmp_path / "evaluated", evaluate=evaluate)[2]
    columns = ["mean_score", "kl", "pg_loss", "vf_loss"]
    assert evaluated[evaluated.step > 0][columns].reset_index(drop=True).equals(plain[columns])


def test_a_resumed_run_continues_exactly(tiny_tokenizer, tmp_path):
    straight = _rewarding_paris(tiny_tokenizer, ROUNDS, tmp_path / "straight", prompts=PROMPTS)
    # killed after its first round: that round's checkpoint (step 6) is the last one written
    _rewarding_paris(tiny_tokenizer, replace(ROUNDS, total_steps=6), tmp_path / "resumed", prompts=PROMPTS)
    resumed = _rewarding_paris(tiny_tokenizer, ROUNDS, tmp_path / "resumed", prompts=PROMPTS, resume=True)
    columns = ["step", "mean_score", "kl", "pg_loss", "vf_loss"]
    assert resumed[2][columns].equals(straight[2][columns])
    assert resumed[3] == straight[3][5:]  # the second round's prompts, in the same order
    for a, b in zip(straight[1].parameters(), resumed[1].parameters()):
        assert torch.equal(a, b)
