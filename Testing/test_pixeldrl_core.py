"""PixelDRL-MG core: reward and return arithmetic, the reward-map convolution, the network, an overfit run."""

from __future__ import annotations

import math

import pytest
import torch
from steprl.errors import InputError
from steprl.segmentation.config import PA3CConfig, PixelDRLConfig, SegTrainConfig
from steprl.segmentation.environment import KEEP, ZERO, SegmentationEnv, reward_map
from steprl.segmentation.networks import PixelDRLNet, count_parameters, format_parameter_summary
from steprl.segmentation.pa3c import (
    RewardMapConv,
    collect_episode,
    discounted_returns,
    episode_loss,
    greedy_masks,
    make_optimizer,
    pa3c_loss,
)

PAPER_PARAMETERS = 7.14e6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _maps(*rows_per_step):
    """Reward maps ``(1, 1, H, W)`` from nested lists."""
    return [torch.tensor(rows, dtype=torch.float32)[None, None] for rows in rows_per_step]


REWARDS = _maps([[1, 0], [0, -1]], [[0, 1], [-1, 0]], [[1, 1], [0, 0]])


# -- returns ---------------------------------------------------------------------------------


@pytest.mark.parametrize("reward_conv", [None, RewardMapConv(33), RewardMapConv(3)])
def test_terminal_returns_hand_computed(reward_conv):
    # gamma 0.5: R2 = r2, R1 = r1 + R2 / 2, R0 = r0 + R1 / 2 (computed by hand)
    returns = discounted_returns(REWARDS, None, 0.5, reward_conv)
    expected = _maps([[1.25, 0.75], [-0.5, -1.0]], [[0.5, 1.5], [-1.0, 0.0]], [[1, 1], [0, 0]])
    for got, want in zip(returns, expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("reward_conv", [None, RewardMapConv(33)])
def test_bootstrapped_returns_hand_computed(reward_conv):
    value = torch.tensor([[2.0, 0.0], [0.0, 4.0]])[None, None]
    returns = discounted_returns(REWARDS, value, 0.5, reward_conv)
    expected = _maps([[1.5, 0.75], [-0.5, -0.5]], [[1.0, 1.5], [-1.0, 1.0]], [[2, 1], [0, 2]])
    for got, want in zip(returns, expected, strict=True):
        assert torch.equal(got, want)


def test_return_is_minus_a_positive_weighted_sum_of_the_step_errors():
    """Why the optimal policy decides at step 1: R(0) = e(0) - sum_t w_t e(t) with every w_t > 0."""
    from steprl.segmentation.pa3c import step_error_weights

    gamma, steps = 0.95, 10
    weights = step_error_weights(steps, gamma)
    assert weights[0] == pytest.approx(0.05) and weights[-1] == pytest.approx(gamma**9)
    assert sum(weights) == pytest.approx(1.0) and min(weights) > 0
    generator = torch.Generator().manual_seed(5)
    gt = (torch.rand(2, 1, 6, 6, generator=generator) > 0.6).float()
    masks = [torch.ones_like(gt)] + [(torch.rand(2, 1, 6, 6, generator=generator) > 0.5).float()
                                     for _ in range(steps)]
    rewards = [reward_map(a, b, gt) for a, b in zip(masks, masks[1:])]
    errors = [(m - gt) ** 2 for m in masks]
    expected = errors[0] - sum(w * e for w, e in zip(weights, errors[1:]))
    torch.testing.assert_close(discounted_returns(rewards, None, gamma)[0], expected)
    # hence a pixel's return is highest when its mask is right at EVERY step, step 1 included
    right = [gt.clone() for _ in range(steps)]
    late = [1 - gt] * 4 + [gt.clone()] * (steps - 4)  # wrong for 4 steps, then corrected
    best = discounted_returns([reward_map(a, b, gt) for a, b in zip([masks[0], *right], right)], None, gamma)[0]
    worse = discounted_returns([reward_map(a, b, gt) for a, b in zip([masks[0], *late], late)], None, gamma)[0]
    assert bool((best > worse).all())


def test_class_weights_balance_object_and_background():
    from steprl.segmentation.pa3c import Episode, class_weights, episode_loss

    gt = torch.zeros(1, 1, 10, 10)
    gt[..., :2, :5] = 1  # 10% object
    w = class_weights(gt)
    assert float((w * gt).sum()) == pytest.approx(float((w * (1 - gt)).sum()))
    assert float(w[gt > 0][0]) == pytest.approx(5.0) and float(w[gt == 0][0]) == pytest.approx(0.5 / 0.9)
    assert torch.equal(class_weights(torch.zeros(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))  # no object: plain rewards
    # in the loss, balancing scales each pixel's rewards (hence returns) by its weight
    logits = [torch.zeros(1, 2, 10, 10)]
    values = [torch.zeros(1, 1, 10, 10)]
    actions = [torch.ones(1, 10, 10, dtype=torch.long)]
    rewards = [torch.ones(1, 1, 10, 10)]
    episode = Episode(logits, values, actions, rewards, [torch.ones(1, 10, 10, dtype=torch.bool)], gt, gt)
    plain = episode_loss(episode, None, PA3CConfig(t_max=1))
    balanced = episode_loss(episode, None, PA3CConfig(t_max=1, class_balance=True))
    assert float(plain["return"]) == pytest.approx(1.0)
    assert float(balanced["return"]) == pytest.approx(float(w.mean()))
    half = episode_loss(episode, None, PA3CConfig(t_max=1, class_balance=True), balance=0.5)
    assert float(half["return"]) == pytest.approx(float((1 + 0.5 * (w - 1)).mean()))


def test_class_balance_anneals_to_the_plain_rewards():
    from steprl.segmentation.pa3c import balance_strength

    assert balance_strength(PA3CConfig(), 0) == 0.0
    assert balance_strength(PA3CConfig(class_balance=True), 10_000) == 1.0
    annealed = PA3CConfig(class_balance=True, class_balance_anneal=200)
    assert [balance_strength(annealed, i) for i in (0, 50, 200, 500)] == [1.0, 0.75, 0.0, 0.0]
    floored = PA3CConfig(class_balance=True, class_balance_anneal=200, class_balance_floor=0.3)
    assert [balance_strength(floored, i) for i in (0, 100, 200, 500)] == [1.0, 0.5, 0.3, 0.3]


def test_identity_conv_returns_equal_plain_n_step_returns():
    gamma = 0.95
    generator = torch.Generator().manual_seed(3)
    rewards = [torch.randint(-1, 2, (2, 1, 5, 7), generator=generator).float() for _ in range(10)]
    returns = discounted_returns(rewards, None, gamma, RewardMapConv(33))
    for t in range(10):
        plain = sum(gamma ** (k - t) * rewards[k] for k in range(t, 10))
        torch.testing.assert_close(returns[t], plain, rtol=0, atol=1e-6)


def test_reward_conv_acts_on_the_next_return_only():
    conv = RewardMapConv(3)
    with torch.no_grad():
        conv.delta.copy_(conv.kernel.new_ones(1, 1, 3, 3) - conv.kernel)  # w = all ones: sum of 3x3 neighbours
    torch.testing.assert_close(conv.kernel, torch.ones(1, 1, 3, 3))
    rewards = _maps([[0.0, 0.0, 2.0]], [[1.0, 0.0, 0.0]])
    returns = discounted_returns(rewards, None, 0.5, conv)
    # R1 = r1 = [1, 0, 0]; w(R1) = [1, 1, 0]; R0 = r0 + 0.5 * w(R1) = [0.5, 0.5, 2]
    torch.testing.assert_close(returns[1], rewards[1])
    torch.testing.assert_close(returns[0], torch.tensor([[[[0.5, 0.5, 2.0]]]]), rtol=0, atol=1e-5)


def test_reward_conv_is_exactly_identity_at_init():
    conv = RewardMapConv(33)
    x = torch.randn(2, 1, 37, 41, generator=torch.Generator().manual_seed(0))
    assert torch.equal(conv(x), x)
    identity = torch.zeros(1, 1, 33, 33)
    identity[0, 0, 16, 16] = 1.0
    assert torch.equal(conv.kernel, identity)
    with pytest.raises(ValueError):
        RewardMapConv(4)


def _one_step_sequences():
    logits = [torch.zeros(1, 2, 1, 2, requires_grad=True)]
    values = [torch.tensor([[[[0.2, 0.2]]]], requires_grad=True)]
    actions = [torch.tensor([[[KEEP, ZERO]]])]
    return logits, values, actions


def test_pa3c_loss_hand_computed():
    logits, values, actions = _one_step_sequences()
    returns = [torch.tensor([[[[1.0, 1.0]]]])]
    losses = pa3c_loss(logits, values, actions, returns)
    advantage = 0.8
    policy = math.log(2) * advantage  # -log(0.5) * A
    value = advantage**2
    entropy = math.log(2)
    assert losses["policy"].item() == pytest.approx(policy, abs=1e-6)
    assert losses["value"].item() == pytest.approx(value, abs=1e-6)
    assert losses["entropy"].item() == pytest.approx(entropy, abs=1e-6)
    assert losses["total"].item() == pytest.approx(policy + 0.5 * value - 0.01 * entropy, abs=1e-6)
    # an inactive pixel leaves the policy and entropy terms (not their denominators), not the value term
    active = [torch.tensor([[[True, False]]])]
    masked = pa3c_loss(logits, values, actions, returns, active_seq=active)
    assert masked["policy"].item() == pytest.approx(policy / 2, abs=1e-6)
    assert masked["entropy"].item() == pytest.approx(entropy / 2, abs=1e-6)
    assert masked["value"].item() == pytest.approx(value, abs=1e-6)


def test_reward_conv_learns_through_the_value_loss_only():
    logits, values, actions = _one_step_sequences()
    conv = RewardMapConv(3)
    rewards = _maps([[1.0, -1.0]], [[1.0, 0.0]])
    returns = discounted_returns(rewards, None, 0.95, conv)
    losses = pa3c_loss(logits * 2, [values[0], values[0]], actions * 2, returns)
    losses["policy"].backward(retain_graph=True)
    assert conv.delta.grad is None or not conv.delta.grad.any()
    losses["value"].backward()
    assert conv.delta.grad is not None and conv.delta.grad.abs().sum() > 0
    # the PixelRL paper's variant: the policy term reaches w too
    conv.delta.grad = None
    returns = discounted_returns(rewards, None, 0.95, conv)
    losses = pa3c_loss(logits * 2, [values[0], values[0]], actions * 2, returns, reward_conv_in_policy=True)
    losses["policy"].backward()
    assert conv.delta.grad is not None and conv.delta.grad.abs().sum() > 0


# -- environment -----------------------------------------------------------------------------


def test_reward_map_formula():
    gt = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    previous = torch.ones_like(gt)
    current = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert torch.equal(reward_map(previous, current, gt), torch.tensor([[[[0.0, 1.0], [0.0, -1.0]]]]))


@pytest.mark.parametrize("allow_revival", [True, False])
def test_environment_2x2_hand_case(allow_revival):
    gt = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    image = torch.tensor([[[[0.9, 0.1], [0.2, 0.8]]]])
    env = SegmentationEnv(t_max=2, allow_revival=allow_revival)
    state = env.reset(image, gt)
    assert torch.equal(state, torch.cat([image, torch.ones_like(image)], dim=1))  # f(0) = 1
    assert env.actionable.all()

    # step 1: keep, zero / keep, zero -> f(1) = [[1, 0], [1, 0]]
    state, reward, changed = env.step(torch.tensor([[[KEEP, ZERO], [KEEP, ZERO]]]))
    assert torch.equal(env.mask, torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]]))
    assert torch.equal(state[:, 1:], env.mask) and torch.equal(state[:, :1], image)
    # r = (f0 - G)^2 - (f1 - G)^2: 0 - 0, 1 - 0, 1 - 1, 0 - 1
    assert torch.equal(reward, torch.tensor([[[[0.0, 1.0], [0.0, -1.0]]]]))
    assert torch.equal(changed, torch.tensor([[[False, True], [False, True]]]))

    # step 2: keep, keep / zero, keep
    state, reward, changed = env.step(torch.tensor([[[KEEP, KEEP], [ZERO, KEEP]]]))
    if allow_revival:  # f(2) = a = [[1, 1], [0, 1]]
        assert torch.equal(env.mask, torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]]))
        assert torch.equal(reward, torch.tensor([[[[0.0, -1.0], [1.0, 1.0]]]]))
        assert torch.equal(changed, torch.tensor([[[False, True], [True, True]]]))
    else:  # f(2) = a * f(1) = [[1, 0], [0, 0]]: the zeros stay
        assert torch.equal(env.mask, torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]))
        assert torch.equal(reward, torch.tensor([[[[0.0, 0.0], [1.0, 0.0]]]]))
        assert torch.equal(changed, torch.tensor([[[False, False], [True, False]]]))
    assert env.done and env.t == 2
    with pytest.raises(RuntimeError):
        env.step(torch.ones(1, 2, 2, dtype=torch.long))


def test_environment_actionable_and_inference_mode():
    image = torch.rand(2, 1, 3, 4)
    env = SegmentationEnv(t_max=3, allow_revival=False)
    env.reset(image)  # no ground truth: inference
    actions = torch.zeros(2, 3, 4, dtype=torch.long)
    actions[0, 0, 0] = KEEP
    _, reward, _ = env.step(actions)
    assert reward is None
    assert env.actionable.sum().item() == 1 and env.actionable[0, 0, 0]
    env_revival = SegmentationEnv(t_max=3)
    env_revival.reset(image)
    env_revival.step(actions)
    assert env_revival.actionable.all()


def test_environment_rejects_bad_inputs():
    env = SegmentationEnv()
    with pytest.raises(InputError):
        env.reset(torch.rand(1, 1, 4, 4, 4))  # 3D
    with pytest.raises(InputError):
        env.reset(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5))
    with pytest.raises(InputError):
        env.reset(torch.rand(1, 1, 4, 4), torch.full((1, 1, 4, 4), 2.0))
    env.reset(torch.rand(1, 1, 4, 4))
    with pytest.raises(ValueError):
        env.step(torch.full((1, 4, 4), 2, dtype=torch.long))
    with pytest.raises(ValueError):
        env.step(torch.ones(1, 4, 4))  # float actions


# -- network ---------------------------------------------------------------------------------


def test_network_outputs_at_input_resolution_for_odd_sizes():
    net = PixelDRLNet(PixelDRLConfig(fusion="input"))
    state = torch.randn(3, 2, 37, 41)
    with torch.no_grad():
        logits, value = net(state)
        logits_only, no_value = net(state, with_value=False)
    assert logits.shape == (3, 2, 37, 41)
    assert value.shape == (3, 1, 37, 41)
    assert no_value is None and torch.equal(logits_only, logits)
    assert torch.isfinite(logits).all() and torch.isfinite(value).all()


def test_network_is_2d_only():
    net = PixelDRLNet(PixelDRLConfig(widths=(8, 16, 32, 64), fusion="input"))
    with pytest.raises(InputError):
        net(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(InputError):
        net(torch.randn(1, 3, 16, 16))
    with pytest.raises(InputError):
        net(torch.randn(1, 2, 7, 16))


def test_parameter_count_close_to_paper():
    net = PixelDRLNet(PixelDRLConfig(fusion="input"))  # the paper's network
    print(f"PixelDRL-MG network: {format_parameter_summary(net)}")
    count = count_parameters(net)
    assert abs(count - PAPER_PARAMETERS) / PAPER_PARAMETERS < 0.05


# -- learning --------------------------------------------------------------------------------


def _disk_in_noise(size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    gt = (((yy - 15.5) ** 2 + (xx - 14.0) ** 2) < 8.0**2).float()[None, None]
    image = gt + 0.3 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(seed))
    return (image - image.mean()) / image.std(), gt


def test_overfit_one_image():
    torch.manual_seed(3)
    image, gt = _disk_in_noise(seed=4)
    config = PA3CConfig()
    net = PixelDRLNet(PixelDRLConfig(widths=(8, 16, 32, 64), fusion="input"))
    reward_conv = RewardMapConv(config.reward_conv_size)
    optimizer = make_optimizer([net, reward_conv], SegTrainConfig().lr)
    env = SegmentationEnv(config.t_max, config.allow_revival)
    generator = torch.Generator().manual_seed(5)
    history = []
    for _ in range(20):
        episode = collect_episode(net, env, image, gt, generator)
        losses = episode_loss(episode, reward_conv, config)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append({name: float(value.detach()) for name, value in losses.items()})
    mask = greedy_masks(net, image, config.t_max, config.allow_revival)[-1]
    dice = (2 * (mask * gt).sum() / (mask.sum() + gt.sum())).item()
    first, last = history[:5], history[-5:]

    def mean(rows, key):
        return sum(row[key] for row in rows) / len(rows)

    print(
        f"overfit: value loss {mean(first, 'value'):.3f} -> {mean(last, 'value'):.3f}, "
        f"total {mean(first, 'total'):.3f} -> {mean(last, 'total'):.3f}, "
        f"return {mean(first, 'return'):.3f} -> {mean(last, 'return'):.3f}, greedy Dice {dice:.3f}"
    )
    assert mean(last, "total") < mean(first, "total")
    assert mean(last, "value") < mean(first, "value")
    assert mean(last, "return") > mean(first, "return")
    assert dice > 0.8
