"""GRPO (common/rl/grpo.py): advantages, ratios, clipped losses and KL terms worked out by hand; the loss moving a
toy policy toward the rewarded response; a resumed run continuing exactly."""
import math
from dataclasses import replace

import pytest
import torch

from common import models
from common.rl import grpo, rollouts
from conftest import tiny_llama


def test_group_advantages_subtract_the_group_mean_and_optionally_divide_by_its_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    assert grpo.group_advantages(rewards).tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4,
                                                       [0.75, -0.25, -0.25, -0.25]]
    # std of [1, 0, 0, 1] is 0.5; of [1, 0, 0, 0] is sqrt(3)/4; a constant group stays at 0
    normed = grpo.group_advantages(rewards, std_normalize=True, eps=0.0)
    assert normed[0].tolist() == [1.0, -1.0, -1.0, 1.0]
    assert normed[1].tolist() == [0.0] * 4 or torch.isnan(normed[1]).all()
    assert normed[2, 0].item() == pytest.approx(0.75 / (math.sqrt(3) / 4))
    assert grpo.group_advantages(rewards[1:2], std_normalize=True).tolist() == [[0.0] * 4]


def test_k3_kl_by_hand():
    ref, logp = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -2.0, -1.0])
    # d = ref - logp = 1, 0, -2: e - 2, 0, e^-2 + 1
    assert grpo.k3_kl(ref, logp).tolist() == pytest.approx([math.e - 2, 0.0, math.exp(-2) + 1])
    assert grpo.k3_kl(torch.tensor([20.0]), torch.tensor([0.0]), clamp=10.0).tolist() == [10.0]
    # a sequence that drifted far: exp(200) is inf in fp32, yet the clamped estimate and its gradient stay finite
    logp = torch.tensor([-200.0], requires_grad=True)
    kl = grpo.k3_kl(torch.tensor([0.0]), logp, clamp=10.0)
    kl.sum().backward()
    assert kl.item() == 10.0 and torch.isfinite(logp.grad).all()


def test_clipped_surrogate_with_sequence_ratio_by_hand():
    logprob, old = torch.tensor([0.1, -0.2, 0.01]), torch.tensor([0.0, 0.0, 0.0])
    advantages = torch.tensor([1.0, -1.0, 2.0])
    ref = torch.tensor([0.1, -0.2, 0.01])  # the reference agrees: no KL
    loss, stats = grpo.grpo_loss(logprob, old, ref, advantages, clip_eps=0.05, kl_coef=1.0)
    # ratios e^0.1 = 1.105, e^-0.2 = 0.819, e^0.01 = 1.010. Response 1 (A > 0) is capped at 1.05; response 2
    # (A < 0) takes the more pessimistic clipped term -0.95; response 3 lies inside the clip range.
    expected = [-1.05, 0.95, -2 * math.exp(0.01)]
    assert loss.item() == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(2 / 3) and stats["kl"] == pytest.approx(0.0, abs=1e-7)
    # ratio 0.819 with A > 0: outside the range, but the min keeps the unclipped term, so nothing is clipped
    _, stats = grpo.grpo_loss(torch.tensor([-0.2]), torch.tensor([0.0]), None, torch.tensor([1.0]), 0.05, 0.0)
    assert stats["clipfrac"] == 0.0
    # with a reference that differs, the mean k3 term is added with its coefficient
    loss_kl, stats = grpo.grpo_loss(logprob, old, ref - 1.0, advantages, clip_eps=0.05, kl_coef=0.5)
    assert stats["kl"] == pytest.approx(math.exp(-1) + 1 - 1)
    assert loss_kl.item() == pytest.approx(loss.item() + 0.5 * math.exp(-1), abs=1e-6)


def toy_policy(tokenizer, seed=0):
    model = tiny_llama(tokenizer, hidden=16, seed=seed, init_std=0.1)
    return models.add_lora(model, models.LoraSettings(r=4, alpha=8), seed=0)


def test_the_loss_moves_the_policy_toward_the_rewarded_response(tiny_tokenizer):
    policy = toy_policy(tiny_tokenizer)
    prompt = tiny_tokenizer("Q:", add_special_tokens=False).input_ids
    a, b = (tiny_tokenizer(t, add_special_tokens=False).input_ids for t in (" Paris", " Rome"))
    group = [rollouts.Rollout(prompt, a), rollouts.Rollout(prompt, b)] * 2
    advantages = grpo.group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0]])).flatten()
    before = grpo.scored_logprobs(policy, group, tiny_tokenizer.pad_token_id, 4)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        logprob = grpo.sequence_logprobs(policy, group, tiny_tokenizer.pad_token_id)
        loss, _ = grpo.grpo_loss(logprob, before, before, advantages, clip_eps=0.2, kl_coef=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = grpo.scored_logprobs(policy, group, tiny_tokenizer.pad_token_id, 4)
    assert after[0] > before[0] and after[1] < before[1]


def test_old_logprobs_do_not_depend_on_what_shares_the_batch(tiny_tokenizer):
    policy = toy_policy(tiny_tokenizer)
    short = rollouts.Rollout(tiny_tokenizer("A:", add_special_tokens=False).input_ids,
                             tiny_tokenizer(" Paris", add_special_tokens=False).input_ids)
    long = rollouts.Rollout(tiny_tokenizer("Q: Where was Velorin born?\nA:", add_special_tokens=False).input_ids,
                            tiny_tokenizer(" Rome Paris Rome", add_special_tokens=False).input_ids)
    alone = grpo.scored_logprobs(policy, [short], tiny_tokenizer.pad_token_id, 1)
    together = grpo.scored_logprobs(policy, [short, long], tiny_tokenizer.pad_token_id, 2)
    assert together[0].item() == pytest.approx(alone[0].item(), abs=1e-5)


def test_the_first_minibatch_is_on_policy_and_later_ones_read_the_collected_logprobs(tiny_tokenizer):
    policy = toy_policy(tiny_tokenizer)
    prompt = tiny_tokenizer("Q:", add_special_tokens=False).input_ids
    a, b = (tiny_tokenizer(t, add_special_tokens=False).input_ids for t in (" Paris", " Rome"))
    flat = [rollouts.Rollout(prompt, a), rollouts.Rollout(prompt, b)] * 2
    pad = tiny_tokenizer.pad_token_id
    permutation = torch.tensor([2, 1, 0, 3]).numpy()
    old = torch.full((4,), float("nan"))  # the first minibatch's (rows 2 and 1) must never be read
    old[[0, 3]] = grpo.scored_logprobs(policy, [flat[0], flat[3]], pad, 2)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    stats = grpo.minibatch_updates(policy, optimizer, scheduler, flat, old, None, torch.tensor([1.0, -1, 1, -1]),
                                   permutation, 2, replace(CFG, kl_coef=0.0), pad, "test", 1, None)
    assert stats[0]["ratio"] == 1.0 and stats[0]["clipfrac"] == 0.0
    assert stats[1]["ratio"] != 1.0  # the policy moved after the first step; rows 0 and 3 compare with `old`


def reward_paris(step, i, texts):
    return [1.0 if t.startswith(" Paris") else 0.0 for t in texts]


CFG = grpo.GRPOConfig(lr=0.05, eta_min=0.05, t_max=100, total_steps=4, prompts_per_step=2, group_size=4,
                      minibatch_size=4, max_new_tokens=2, kl_coef=0.1, checkpoint_every=2, eval_every=2,
                      sample_batch_size=2)


def test_a_resumed_run_continues_exactly(tiny_tokenizer, tmp_path):
    prompts = ["Q:", "A:", "Q: Where was Velorin born?\nA:"]
    evaluations = []

    def evaluate(step):
        evaluations.append(step)
        return {"eval": float(step)}

    straight = grpo.train_grpo(toy_policy(tiny_tokenizer), tiny_tokenizer, prompts, reward_paris, CFG,
                               tmp_path / "straight", seed=0, evaluate=evaluate)
    assert straight.step.tolist() == [0, 1, 2, 3, 4] and evaluations == [0, 2, 4]
    assert {"reward", "informative_groups", "kl", "clipfrac", "ratio", "loss", "response_tokens"} <= set(straight)

    grpo.train_grpo(toy_policy(tiny_tokenizer), tiny_tokenizer, prompts, reward_paris, replace(CFG, total_steps=2),
                    tmp_path / "resumed", seed=0)  # stops at step 2, as a killed run would have last saved
    policy = toy_policy(tiny_tokenizer)
    resumed = grpo.train_grpo(policy, tiny_tokenizer, prompts, reward_paris, CFG, tmp_path / "resumed", seed=0,
                              resume=True)
    columns = ["step", "reward", "kl", "loss", "ratio"]
    pd_equal = resumed[columns].round(6).equals(straight[straight.step > 0][columns].reset_index(drop=True).round(6))
    assert pd_equal
    # and a finished run is loaded, not retrained
    again = grpo.train_grpo(toy_policy(tiny_tokenizer), tiny_tokenizer, prompts, reward_paris, CFG,
                            tmp_path / "straight", seed=0)
    assert again.step.tolist() == straight.step.tolist()


def test_a_non_finite_loss_names_the_step_and_the_last_good_checkpoint(tiny_tokenizer, tmp_path):
    def nan_reward(step, i, texts):
        return [float("nan")] * len(texts)

    with pytest.raises(FloatingPointError, match="at step 1; last good checkpoint: none"):
        grpo.train_grpo(toy_policy(tiny_tokenizer), tiny_tokenizer, ["Q:"], nan_reward, CFG, tmp_path, seed=0)
