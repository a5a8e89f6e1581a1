"""Unit tests of the SPAC engine: environment, networks, replay buffer, learner and ``register()``.

Everything runs on tiny grids on the CPU. Expected values are computed independently of the
code under test where that is cheap: the soft Dice with numpy + scipy's ``map_coordinates``,
the plan's log-density with ``torch.distributions``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from steprl import modelfile, spatial
from steprl.errors import InputError
from steprl.geometry import Geometry, Image
from steprl.registration.data import SyntheticPairSource
from steprl.registration.environment import RegistrationEnv
from steprl.registration.inference import register
from steprl.registration.learner import SPACLearner, SPACTrainConfig
from steprl.registration.model import load_spac
from steprl.registration.networks import Critic, SPACConfig, SPACPolicy, count_parameters, squash
from steprl.registration.replay import ReplayBuffer
from steprl.synth.toy import synthetic_pair
from steprl.training.distributed import single_process
from torch.distributions import Normal, TransformedDistribution
from torch.distributions.transforms import TanhTransform

TINY = {2: SPACConfig(ndim=2, grid=(32, 32), channels=(8, 16), plan_dim=4, critic_channels=(4, 4)),
        3: SPACConfig(ndim=3, grid=(16, 16, 16), channels=(8, 16), plan_dim=4, critic_channels=(4, 4))}
PAPER_2D_POLICY_PARAMETERS = 107_000  # SPAC paper, 2D planner + actor


# ---- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[int, Path]:
    """Untrained tiny SPAC model files, 2D and 3D, saved like a real model."""
    folder = tmp_path_factory.mktemp("spac_units_models")
    paths = {}
    for nd, cfg in TINY.items():
        torch.manual_seed(nd)
        policy = SPACPolicy(cfg)
        card = {"method": "spac", "ndim": nd, "config": cfg.to_dict(), "inference": {"max_step": 3.0, "steps": 3}}
        paths[nd] = modelfile.save_model(folder / f"spac{nd}d_tiny", policy.state_dict(), card)
    return paths


def _pair_images(shape: tuple[int, ...], spacing: tuple[float, ...], seed: int = 0) -> dict[str, Image]:
    """A synthetic pair as Images on an anisotropic grid (shape in array order, spacing xyz)."""
    pair = synthetic_pair(shape, np.random.default_rng(seed), max_displacement=2.0)
    geometry = Geometry(shape, spacing, (0.0,) * len(shape), np.eye(len(shape)))
    return {k: Image(v, geometry) for k, v in pair.items()}


# ---- environment -------------------------------------------------------------------------
def _env_inputs(seed: int = 0, shape=(16, 16), batch: int = 2):
    rng = np.random.default_rng(seed)
    pairs = [synthetic_pair(shape, rng, max_displacement=2.0) for _ in range(batch)]
    def stack(key, dtype):
        return torch.from_numpy(np.stack([p[key] for p in pairs])[:, None]).to(dtype)

    return (stack("fixed", torch.float32), stack("moving", torch.float32),
            stack("fixed_labels", torch.long), stack("moving_labels", torch.long))


def _smooth_action(batch: int, shape: tuple[int, ...], scale: float, seed: int) -> torch.Tensor:
    """A smooth random voxel step ``(B, ndim, *S)`` of about ``scale`` voxels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, len(shape), *[4] * len(shape), generator=g)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return scale * torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)


def _expected_soft_dice(fixed_labels: np.ndarray, moving_labels: np.ndarray, field: np.ndarray,
                        num_labels: int) -> float:
    """Mean over labels 1..K present in either map of ``2 |F M| / (|F| + |M|)``, one item.

    ``M`` is the moving one-hot label warped LINEARLY by the voxel field ``(ndim, *S)``
    (pull-back, border values outside), computed with scipy rather than torch.
    """
    coords = np.indices(fixed_labels.shape, dtype=np.float64) + field
    dices = []
    for k in range(1, num_labels + 1):
        f = (fixed_labels == k).astype(np.float64)
        m = ndimage.map_coordinates((moving_labels == k).astype(np.float64), coords, order=1, mode="nearest")
        total = f.sum() + m.sum()
        if total > 0:
            dices.append(2 * (f * m).sum() / total)
    return float(np.mean(dices))


def test_env_reward_is_soft_dice_improvement_times_scale():
    fixed, moving, fl, ml = _env_inputs()
    env = RegistrationEnv(fixed, moving, fl, ml, num_labels=4, max_steps=5, max_step=1.0, reward_scale=7.0)
    shape = tuple(fixed.shape[2:])
    fields = [env.field.clone()]
    rewards = []
    for seed in (1, 2):
        out = env.step(_smooth_action(2, shape, 0.8, seed))
        rewards.append(out.reward)
        fields.append(env.field.clone())
    assert fields[1].abs().max() > 0.2  # the steps really moved the labels
    for b in range(2):
        dice = [_expected_soft_dice(fl[b, 0].numpy(), ml[b, 0].numpy(), f[b].double().numpy(), 4) for f in fields]
        assert env.dice[b].item() == pytest.approx(dice[-1], abs=1e-5)
        for t, reward in enumerate(rewards):
            assert reward[b].item() == pytest.approx(7.0 * (dice[t + 1] - dice[t]), abs=1e-4)
    assert any(abs(r[b].item()) > 1e-3 for r in rewards for b in range(2))  # not trivially zero


def test_env_warps_the_original_moving_image_by_the_accumulated_field():
    fixed, moving, fl, ml = _env_inputs(seed=3)
    env = RegistrationEnv(fixed, moving, fl, ml, num_labels=4, max_steps=5, max_step=2.0)
    shape = tuple(fixed.shape[2:])
    a1, a2 = _smooth_action(2, shape, 1.0, 11), _smooth_action(2, shape, 1.0, 12)
    out1 = env.step(a1)
    out2 = env.step(a2)
    a1c, a2c = a1.clamp(-2.0, 2.0), a2.clamp(-2.0, 2.0)
    accumulated = spatial.compose(spatial.compose(torch.zeros_like(a1c), a1c), a2c)
    expected = spatial.warp(moving, accumulated)
    torch.testing.assert_close(env.field, accumulated, atol=1e-6, rtol=0)
    torch.testing.assert_close(env.warped(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out2.state, torch.cat([fixed, expected], dim=1), atol=1e-6, rtol=0)
    assert torch.equal(out1.state[:, :1], fixed)
    rewarped = spatial.warp(spatial.warp(moving, a1c), a2c)  # what the env must NOT do
    assert not torch.equal(env.warped(), rewarped)
    assert (env.warped() - rewarped).abs().max() > 1e-4


def test_env_clamps_each_step_component_and_ends_after_max_steps():
    fixed, moving, fl, ml = _env_inputs(seed=4)
    env = RegistrationEnv(fixed, moving, fl, ml, num_labels=4, max_steps=3, max_step=0.75)
    shape = tuple(fixed.shape[2:])
    big = _smooth_action(2, shape, 3.0, 5)
    assert big.abs().max() > 0.75 * 2
    out = env.step(big)
    torch.testing.assert_close(env.field, big.clamp(-0.75, 0.75), atol=1e-6, rtol=0)  # compose(0, a) == a
    assert env.field.abs().max() <= 0.75 + 1e-6
    assert not out.done and env.t == 1
    assert not env.step(big).done
    assert env.step(torch.zeros_like(big)).done and env.t == 3
    state = env.reset()
    assert env.t == 0 and torch.count_nonzero(env.field) == 0
    torch.testing.assert_close(state, torch.cat([fixed, moving], dim=1), atol=1e-6, rtol=0)


# ---- networks ----------------------------------------------------------------------------
@pytest.mark.parametrize("nd", [2, 3])
def test_network_output_shapes(nd):
    cfg = TINY[nd]
    torch.manual_seed(0)
    policy, critic = SPACPolicy(cfg), Critic(cfg)
    state = torch.rand(3, 2, *cfg.grid)
    mu, log_std, skips = policy.planner(state)
    assert mu.shape == log_std.shape == (3, cfg.plan_dim)
    lo, hi = cfg.log_std_range
    assert (log_std >= lo).all() and (log_std <= hi).all()
    assert [s.shape[1] for s in skips] == list(cfg.channels)
    plan, step = policy.act(state, deterministic=False)
    assert plan.shape == (3, cfg.plan_dim) and plan.abs().max() <= 1.0
    assert step.shape == (3, nd, *cfg.grid)
    plan_mean, _ = policy.act(state, deterministic=True)
    torch.testing.assert_close(plan_mean, torch.tanh(mu))
    assert critic(state, plan).shape == (3, 1)


@pytest.mark.parametrize("grid, channels", [((30, 32), (8, 16)), ((24, 24), (8, 16, 16, 16)),
                                            ((16, 16, 20), (8, 16, 16))])
def test_config_rejects_grid_not_divisible_by_levels(grid, channels):
    with pytest.raises(ValueError, match="divisible"):
        SPACConfig(ndim=len(grid), grid=grid, channels=channels)


def test_config_rejects_wrong_grid_length():
    with pytest.raises(ValueError):
        SPACConfig(ndim=3, grid=(32, 32))


def test_default_2d_parameter_count_near_paper():
    cfg = SPACConfig()
    n_policy = count_parameters(SPACPolicy(cfg))
    print(f"default 2D SPAC policy (planner + actor): {n_policy:,} parameters; "
          f"critic: {count_parameters(Critic(cfg)):,}")
    assert abs(n_policy - PAPER_2D_POLICY_PARAMETERS) <= 0.2 * PAPER_2D_POLICY_PARAMETERS


def test_config_dict_round_trip():
    cfg = SPACConfig(ndim=3, grid=(32, 64, 32), channels=(4, 8, 8), plan_dim=6, critic_channels=(2, 4),
                     log_std_range=(-4.0, 0.5))
    as_json = json.loads(json.dumps(cfg.to_dict()))
    back = SPACConfig.from_dict(as_json)
    assert back == cfg and isinstance(back.grid, tuple)
    assert SPACConfig.from_dict({**as_json, "unknown_key": 1}) == cfg  # future keys are ignored


@pytest.mark.parametrize("deterministic", [False, True])
def test_squash_log_prob_matches_torch_distributions(deterministic):
    torch.manual_seed(0)
    mu = 1.5 * torch.randn(6, 5, dtype=torch.float64)
    log_std = 0.5 * torch.randn(6, 5, dtype=torch.float64) - 0.5
    plan, log_prob = squash(mu, log_std, deterministic)
    assert plan.shape == mu.shape and log_prob.shape == (6,)
    dist = TransformedDistribution(Normal(mu, log_std.exp()), [TanhTransform()])
    expected = dist.log_prob(plan).sum(-1)
    torch.testing.assert_close(log_prob, expected, atol=1e-4, rtol=0)
    if deterministic:
        torch.testing.assert_close(plan, torch.tanh(mu))


# ---- replay buffer -----------------------------------------------------------------------
def _transitions(batch: int, start: float, shape=(8, 8)):
    state = torch.full((batch, 2, *shape), start) + torch.arange(batch).view(-1, 1, 1, 1)
    plan = torch.full((batch, 4), start) + torch.arange(batch).view(-1, 1)
    reward = start + torch.arange(batch, dtype=torch.float32)
    return state, plan, reward, state + 0.5


def test_replay_ring_overwrites_oldest():
    buf = ReplayBuffer(3)
    buf.add(*_transitions(2, 0.0), done=False)
    assert len(buf) == 2 and buf.next == 2
    buf.add(*_transitions(2, 10.0), done=True)  # rewards 10, 11: 10 fills slot 2, 11 replaces slot 0
    assert len(buf) == 3 and buf.next == 1
    assert [item[2].item() for item in buf.items] == [11.0, 1.0, 10.0]
    assert [item[4].item() for item in buf.items] == [1.0, 0.0, 1.0]
    assert buf.items[0][0].dtype == torch.float16 and buf.items[0][1].dtype == torch.float32
    with pytest.raises(ValueError):
        ReplayBuffer(0)


def test_replay_tensors_round_trip():
    buf = ReplayBuffer(5)
    assert buf.to_tensors() == {}
    buf.add(*_transitions(3, 1.0), done=False)
    buf.add(*_transitions(1, 4.0), done=True)
    tensors = buf.to_tensors()
    assert tensors["replay.state"].shape == (4, 2, 8, 8) and tensors["replay.reward"].shape == (4,)
    other = ReplayBuffer(5)
    other.load_tensors(tensors)
    assert len(other) == 4
    for a, b in zip(buf.items, other.items):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    other.load_tensors({})
    assert len(other) == 0


def test_replay_sample_shapes_and_device():
    buf = ReplayBuffer(10)
    buf.add(*_transitions(4, 0.0), done=False)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        s, z, r, s2, d = buf.sample(6, np.random.default_rng(0), device)
        assert s.shape == s2.shape == (6, 2, 8, 8) and z.shape == (6, 4) and r.shape == d.shape == (6,)
        assert all(t.device.type == device for t in (s, z, r, s2, d))
        assert s.dtype == s2.dtype == z.dtype == r.dtype == torch.float32
        torch.testing.assert_close(s2 - s, torch.full_like(s, 0.5))  # the rows stay together


# ---- learner -----------------------------------------------------------------------------
def _learner(seed: int) -> SPACLearner:
    cfg = SPACTrainConfig(batch_pairs=2, episode_steps=2, replay_batch=4, val_steps=2, seed=seed)
    return SPACLearner(TINY[2], cfg, SyntheticPairSource((32, 32), val_pairs=2), single_process("cpu"))


def _weights(learner: SPACLearner) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name, module in learner.modules.items()
            for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def trained_weights() -> dict[str, tuple[dict[str, torch.Tensor], dict[str, float], SPACLearner]]:
    """Three train_iterations of two learners with seed 0 and one with seed 1 (run one after another)."""
    out = {}
    for key, seed in (("a", 0), ("b", 0), ("c", 1)):
        learner = _learner(seed)
        logs = [learner.train_iteration(i) for i in range(3)]
        out[key] = (_weights(learner), logs[-1], learner)
    return out


def test_learner_is_reproducible(trained_weights):
    (wa, logs, learner), (wb, _, _) = trained_weights["a"], trained_weights["b"]
    assert "critic_loss" in logs  # the SAC update ran (replay_batch reached)
    assert len(learner.replay) == 3 * 2 * 2
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    fresh = _weights(_learner(0))
    assert any(not torch.equal(wa[k], fresh[k]) for k in wa if k.startswith("policy."))  # it did learn something


def test_learner_other_seed_differs(trained_weights):
    wa, wc = trained_weights["a"][0], trained_weights["c"][0]
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_learner_validate_keys(trained_weights):
    metrics = trained_weights["a"][2].validate()
    for key in ("score", "dice_identity", "dice_step1", "dice_final"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert 0.0 <= metrics["folding_percent"] <= 100.0
    assert 0.0 <= metrics["std_log_jacobian"] < 5.0  # finite: folded voxels enter clipped, not as -inf
    assert metrics["score"] == metrics["dice_final"]


# ---- register() --------------------------------------------------------------------------
def test_register_yields_steps_plus_one(tiny_models):
    images = _pair_images((24, 28), (1.5, 1.2))
    results = list(register(images["fixed"], images["moving"], tiny_models[2], steps=3, device="cpu",
                            fixed_labels=Image(images["fixed_labels"].array, images["fixed"].geometry),
                            moving_labels=Image(images["moving_labels"].array, images["moving"].geometry)))
    assert [r.step for r in results] == [0, 1, 2, 3]
    assert torch.count_nonzero(results[0].voxel_field) == 0
    assert results[0].voxel_field.shape == (1, 2, 32, 32)
    for r in results:
        assert math.isfinite(r.metrics["ncc"]) and 0.0 <= r.metrics["dice"] <= 1.0
        assert r.warped.geometry.matches(images["fixed"].geometry)
        assert r.displacement.array.shape == (32, 32, 2)
    np.testing.assert_allclose(results[0].warped.array, images["moving"].array, atol=1e-5)  # same grid, no step


def test_register_3d_default_steps(tiny_models):
    images = _pair_images((10, 12, 14), (1.5, 1.2, 2.0), seed=1)
    results = list(register(images["fixed"], images["moving"], tiny_models[3], device="cpu"))
    assert len(results) == 3 + 1  # the card's default steps
    assert results[-1].voxel_field.shape == (1, 3, 16, 16, 16)
    assert results[-1].warped.array.shape == (10, 12, 14)


def test_register_early_stop_with_zero_steps(tiny_models):
    spac = load_spac(tiny_models[2])
    with torch.no_grad():
        spac.policy.actor.out.weight.zero_()
        spac.policy.actor.out.bias.zero_()
    images = _pair_images((24, 28), (1.5, 1.2))
    results = list(register(images["fixed"], images["moving"], spac, steps=6, device="cpu", early_stop=1))
    assert 2 <= len(results) <= 3  # stopped after step 2 at most
    assert all(torch.count_nonzero(r.voxel_field) == 0 for r in results)
    assert len(list(register(images["fixed"], images["moving"], spac, steps=6, device="cpu"))) == 7


def test_register_labels_on_one_side_only(tiny_models):
    images = _pair_images((24, 28), (1.5, 1.2))
    with pytest.raises(InputError, match="label"):
        list(register(images["fixed"], images["moving"], tiny_models[2], steps=1, device="cpu",
                      fixed_labels=images["fixed_labels"]))
    with pytest.raises(InputError, match="label"):
        list(register(images["fixed"], images["moving"], tiny_models[2], steps=1, device="cpu",
                      moving_labels=images["moving_labels"]))


def test_register_model_of_wrong_dimension(tiny_models):
    images = _pair_images((24, 28), (1.5, 1.2))
    with pytest.raises(InputError, match="3D"):
        list(register(images["fixed"], images["moving"], tiny_models[3], steps=1, device="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_register_cuda_unavailable_is_a_clear_error(tiny_models):
    images = _pair_images((24, 28), (1.5, 1.2))
    with pytest.raises(InputError, match="CUDA is not available") as info:
        list(register(images["fixed"], images["moving"], tiny_models[2], steps=1, device="cuda"))
    assert "cpu" in info.value.fix


def test_warped_slice_is_the_middle_slice_of_the_full_warp(tiny_models):
    """The pictures warp one slice only; it must be exactly that slice of the full warp (oblique, anisotropic)."""
    images = _pair_images((10, 12, 14), (1.5, 1.2, 2.0), seed=2)
    c, s = np.cos(0.3), np.sin(0.3)
    oblique = Geometry((10, 12, 14), (1.5, 1.2, 2.0), (4.0, -3.0, 7.0), np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]))
    fixed = Image(images["fixed"].array, oblique)
    last = list(register(fixed, images["moving"], tiny_models[3], steps=2, device="cpu"))[-1]
    for axis in (0, 1, 2):
        want = np.take(last.warped.array, fixed.geometry.shape[axis] // 2, axis=axis)
        np.testing.assert_allclose(last.warped_slice(axis), want, atol=1e-5)
