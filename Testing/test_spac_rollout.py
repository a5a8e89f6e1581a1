"""The 3D recipe's pieces, on small 2D problems: training through the rollout, the normalised and
bounded policy, blurred label Dice, and warm starts (``--init-from``).

The one-pair test keeps the recipe honest (issue 11): a small policy must fit a single synthetic
pair quickly and stably, or no amount of CPU time will make it learn many pairs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from steprl import modelfile, spatial
from steprl.errors import ModelFileError
from steprl.registration.data import SyntheticPairSource
from steprl.registration.environment import RegistrationEnv
from steprl.registration.learner import SPACLearner, SPACTrainConfig
from steprl.registration.networks import SPACConfig, SPACPolicy, planner_input
from steprl.training.distributed import single_process

RECIPE_NET = SPACConfig(ndim=2, grid=(32, 32), channels=(8, 16, 16), plan_dim=4, critic_channels=(4, 4),
                        norm="instance", stem=4, features="diff", step_bound=1.0)


class OnePair:
    """A pair source that always returns the same pair (its validation pair)."""

    labels_are_real = True

    def __init__(self) -> None:
        self._source = SyntheticPairSource((32, 32), val_pairs=1, max_displacement=3.0)
        self.num_labels = self._source.num_labels

    def sample(self, n, rng):
        return self._source.validation()

    def validation(self):
        return self._source.validation()


def _recipe(lr: float = 3e-3, **kw) -> SPACTrainConfig:
    return SPACTrainConfig(batch_pairs=1, episode_steps=4, unroll=4, lr=lr, ncc_weight=0.0, dice_weight=1.0,
                           label_sigma=0.7, smooth_weight=0.1, train_max_step=1.0, test_max_step=1.0, val_steps=4,
                           sac_start=10**9, **kw)


def test_the_recipe_policy_fits_one_pair_within_40_updates_and_dice_rises_with_the_steps():
    torch.manual_seed(0)
    learner = SPACLearner(RECIPE_NET, _recipe(), OnePair(), single_process("cpu"))
    for i in range(40):  # one update per episode (4 steps, window 4)
        learner.train_iteration(i)
    v = learner.validate()
    assert v["dice_identity"] < 0.75
    assert v["dice_final"] >= 0.9, v  # measured 0.966 (plain network without norm, stem and bound: 0.884)
    assert v["dice_identity"] < v["dice_step1"] < v["dice_final"]
    assert v["folding_percent"] < 0.5


def test_rollout_training_is_stable_at_a_large_learning_rate():
    """The bounded step cannot blow up: at lr 3e-2 the steps stay within the bound."""
    torch.manual_seed(1)
    learner = SPACLearner(RECIPE_NET, _recipe(lr=3e-2), OnePair(), single_process("cpu"))
    logs = [learner.train_iteration(i) for i in range(10)]
    assert all(np.isfinite(list(entry.values())).all() for entry in logs)
    state = torch.cat([learner.source.validation().fixed, learner.source.validation().moving], dim=1)
    _, step = learner.policy.act(state)
    assert step.abs().max() <= 1.0 + 1e-6


def test_rollout_keeps_no_replay_before_sac_and_counts_its_updates():
    torch.manual_seed(2)
    cfg = _recipe(lr=1e-3)
    cfg.episode_steps, cfg.unroll = 6, 4  # windows of 4 and 2 steps: two updates per episode
    learner = SPACLearner(RECIPE_NET, cfg, OnePair(), single_process("cpu"))
    before = [p.detach().clone() for p in learner.policy.parameters()]
    logs = learner.train_iteration(0)
    assert len(learner.replay) == 0  # SAC is far away: no replay memory (nor checkpoint bulk)
    assert {"soft_dice", "smooth", "soft_dice_last"} <= set(logs) and "reward" not in logs  # no scoring before SAC
    assert learner.optimizers["policy"].state[next(learner.policy.parameters())]["step"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.policy.parameters()))


def test_blurred_label_dice_still_speaks_where_thin_structures_do_not_overlap():
    """A 1-voxel-thick structure shifted by 2 or 3 voxels: crisp Dice is 0 at both (no gradient), blurred is not."""
    labels = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    labels[0, 0, 16, 4:28] = 1  # a thin horizontal line
    image = labels.float()
    env = RegistrationEnv(image, image, labels, labels, 1, 4)

    def dice(shift: float, sigma: float) -> float:
        u = torch.zeros(1, 2, 32, 32)
        u[:, 0] = shift
        return env.dice_of(u, sigma).item()

    assert dice(2.0, 0.0) == dice(3.0, 0.0) == 0.0
    blurred = [dice(s, 1.0) for s in (0.0, 1.0, 2.0, 3.0)]
    assert blurred == sorted(blurred, reverse=True) and blurred[2] - blurred[3] > 0.01


def test_planner_input_features():
    state = torch.rand(2, 2, 8, 8)
    assert planner_input(state, "pair") is state
    diff = planner_input(state, "diff")
    torch.testing.assert_close(diff[:, 2], state[:, 0] - state[:, 1])
    demons = planner_input(state, "demons")
    assert demons.shape == (2, 5, 8, 8)
    gy = torch.gradient(state[:, 1], dim=(1, 2))[0]
    torch.testing.assert_close(demons[:, 3], (state[:, 0] - state[:, 1]) * gy)
    with pytest.raises(ValueError, match="features"):
        SPACConfig(ndim=2, grid=(32, 32), features="nonsense")


def test_old_cards_rebuild_the_original_network():
    """Cards written before the recipe options lack them: the network must be the original one."""
    old = {"ndim": 2, "grid": [32, 32], "channels": [8, 16], "plan_dim": 4, "critic_channels": [4, 4],
           "log_std_range": [-5.0, 1.0]}
    cfg = SPACConfig.from_dict(old)
    assert (cfg.norm, cfg.stem, cfg.features, cfg.step_bound) == ("none", 0, "pair", 0.0)
    names = set(SPACPolicy(cfg).state_dict())
    assert not any("stem" in n for n in names)


def test_init_from_warm_starts_on_another_grid_and_carries_the_record(tmp_path):
    torch.manual_seed(3)
    source = SyntheticPairSource((32, 32), val_pairs=1)
    first = SPACLearner(RECIPE_NET, _recipe(), source, single_process("cpu"))
    first.train_iteration(0)
    state, card = first.export_model()
    card["training"].update(global_step=1, epoch=1)
    path = modelfile.save_model(tmp_path / "stage1", state, card)

    bigger = SPACConfig(**{**RECIPE_NET.__dict__, "grid": (64, 64)})
    second = SPACLearner(bigger, _recipe(), SyntheticPairSource((64, 64), val_pairs=1), single_process("cpu"))
    second.init_from(path)
    for name, tensor in second.policy.state_dict().items():
        torch.testing.assert_close(tensor, state[name])
    _, card2 = second.export_model()
    assert card2["training"]["earlier_runs"][0]["global_step"] == 1

    other = SPACConfig(**{**RECIPE_NET.__dict__, "norm": "none"})
    third = SPACLearner(other, _recipe(), source, single_process("cpu"))
    with pytest.raises(ModelFileError, match="norm"):
        third.init_from(path)


def test_environment_advance_scores_like_step():
    source = SyntheticPairSource((16, 16), val_pairs=2)
    b = source.validation()
    step = torch.full((2, 2, 16, 16), 0.3)
    a = RegistrationEnv(b.fixed, b.moving, b.fixed_labels, b.moving_labels, source.num_labels, 3)
    c = RegistrationEnv(b.fixed, b.moving, b.fixed_labels, b.moving_labels, source.num_labels, 3)
    out_a = a.step(step)
    out_c = c.advance(spatial.compose(c.field, step))
    torch.testing.assert_close(out_a.reward, out_c.reward)
    torch.testing.assert_close(out_a.state, out_c.state)


def test_rollout_with_sac_fills_the_replay_and_updates_the_critics():
    torch.manual_seed(4)
    cfg = _recipe(lr=1e-3)
    cfg.sac_start, cfg.replay_batch = 0, 4  # SAC from the first episode
    cfg.unroll = 2  # two windows of 2 steps: 4 transitions, then a SAC update
    learner = SPACLearner(RECIPE_NET, cfg, OnePair(), single_process("cpu"))
    critic = [p.detach().clone() for p in learner.critic1.parameters()]
    logs = learner.train_iteration(0)
    assert len(learner.replay) == 4
    assert {"reward", "critic_loss", "dice_final"} <= set(logs)
    assert any(not torch.equal(a, b) for a, b in zip(critic, learner.critic1.parameters()))


def test_zero_mean_steps_have_no_global_shift_and_warm_start_from_a_model_without_it(tmp_path):
    torch.manual_seed(5)
    drifting = SPACConfig(**{**RECIPE_NET.__dict__, "step_bound": 0.0})
    policy = SPACPolicy(drifting)
    torch.nn.init.constant_(policy.actor.out.bias, 0.3)  # a constant step, the drift zero_mean removes
    state = torch.rand(2, 2, 32, 32)
    _, step = policy.act(state)
    assert step.mean((2, 3)).abs().min() > 0.1
    card = {"method": "spac", "ndim": 2, "config": drifting.to_dict()}
    path = modelfile.save_model(tmp_path / "drifting", policy.state_dict(), card)

    centred = SPACConfig(**{**RECIPE_NET.__dict__, "step_bound": 0.0, "zero_mean": True})
    learner = SPACLearner(centred, _recipe(), OnePair(), single_process("cpu"))
    learner.init_from(path)  # zero_mean changes no weight: the warm start is allowed
    _, step = learner.policy.act(state)
    assert step.mean((2, 3)).abs().max() < 1e-5


def test_field_input_widens_a_warm_start_without_changing_what_it_computes(tmp_path):
    torch.manual_seed(6)
    plain = SPACConfig(**{**RECIPE_NET.__dict__})
    policy = SPACPolicy(plain)
    card = {"method": "spac", "ndim": 2, "config": plain.to_dict()}
    path = modelfile.save_model(tmp_path / "plain", policy.state_dict(), card)

    aware = SPACConfig(**{**RECIPE_NET.__dict__, "field_input": True})
    assert aware.observation_channels == 4 and aware.state_channels == plain.state_channels + 2
    learner = SPACLearner(aware, _recipe(), OnePair(), single_process("cpu"))
    learner.init_from(path)
    images = torch.rand(2, 2, 32, 32)
    field = torch.randn(2, 2, 32, 32)
    _, before = policy.act(images)
    _, after = learner.policy.act(torch.cat([images, field], dim=1))
    torch.testing.assert_close(after, before)  # zero weights for the new channels: the same function
    logs = learner.train_iteration(0)  # the rollout feeds (fixed, warped, field) states
    assert np.isfinite(logs["soft_dice"])
    assert learner.validate()["dice_final"] >= 0.0


def test_register_runs_a_field_input_policy(tmp_path):
    from steprl.geometry import Geometry, Image
    from steprl.registration.inference import register

    cfg = SPACConfig(**{**RECIPE_NET.__dict__, "field_input": True})
    torch.manual_seed(7)
    card = {"method": "spac", "ndim": 2, "config": cfg.to_dict(), "inference": {"steps": 3, "max_step": 1.0}}
    path = modelfile.save_model(tmp_path / "aware", SPACPolicy(cfg).state_dict(), card)
    b = SyntheticPairSource((24, 28), val_pairs=1).validation()
    geometry = Geometry((24, 28), (1.0, 1.0), (0.0, 0.0), np.eye(2))
    results = list(register(Image(b.fixed[0, 0].numpy(), geometry), Image(b.moving[0, 0].numpy(), geometry), path,
                            device="cpu", refine_steps=0))
    assert [r.step for r in results] == [0, 1, 2, 3]


def test_committed_warm_start_snapshots_load_and_carry_their_training_record(repo_root):
    """The next session's run starts from these (trainer/snapshots/README.md): they must load with this code.
    Registration snapshots are 3D SPAC models; a segmentation one loads as a segmentation model."""
    from steprl.modelfile import read_card
    from steprl.registration.model import load_spac
    from steprl.segmentation.model import load_segmenter

    snapshots = sorted((repo_root / "trainer" / "snapshots").glob("*.safetensors"))
    assert snapshots, "trainer/snapshots holds the latest weights of every model still in training"
    for path in snapshots:
        if read_card(path)["method"] == "spac":
            spac = load_spac(path)
            training, task = spac.card["training"], "registration"
            assert spac.config.ndim == 3
        else:
            training, task = load_segmenter(path).card["training"], "segmentation"
        assert training["command"].startswith(f"steprl train {task}"), path.name
        runs = training.get("record", {}).get("runs") or training.get("earlier_runs")
        assert runs, path.name  # every run that led to these weights
