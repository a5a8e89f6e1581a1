"""The registration settings (steprl.registration.config) and the ``train registration`` options made from them.

Each hyper-parameter's default is written once, in its dataclass; the command line adds only the
defaults that depend on the data or on another option. No torch is needed for any of this.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import textwrap
import typing

import pytest
from steprl.cli import build_parser
from steprl.registration.config import FEATURE_CHANNELS, Features, SPACConfig, SPACTrainConfig, missing_settings
from steprl.registration.training import registration_configs

#: every option ``steprl train registration --help`` listed before its options came from the dataclasses
OPTIONS_BEFORE = {
    "--batch", "--bf16", "--channels", "--cross-contrast", "--data-licence", "--debug", "--device", "--dice-weight",
    "--distance-clip", "--distance-weight", "--episode-steps", "--epochs", "--features", "--field-input",
    "--field-level", "--field-weight", "--gamma-augment", "--grad-clip", "--grid", "--help", "--images", "--init-from",
    "--iterations", "--known-field-scale", "--known-pairs", "--label-sigma", "--labels", "--lr", "--ncc-weight",
    "--ncc-window", "--no-resume", "--no-tensorboard", "--norm", "--out", "--plan-dim", "--prior-scale",
    "--prior-sigma", "--quiet", "--replay-batch", "--sac-start", "--seed", "--smooth-weight", "--stem", "--step-bound",
    "--strip-fraction", "--supersample", "--synth-spacing", "--synthetic", "--synthseg", "--t1-fraction",
    "--test-count", "--test-max-step", "--train-max-step", "--unroll", "--val-count", "--val-steps",
    "--zero-mean-step", "-h",
}


def _train_parser() -> argparse.ArgumentParser:
    def sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices[name]

    return sub(sub(build_parser(), "train"), "registration")


def _configs(*argv: str, grid: tuple[int, ...] = (32, 32)) -> tuple[SPACConfig, SPACTrainConfig]:
    args = build_parser().parse_args(["train", "registration", "--out", "x", *argv])
    return registration_configs(args, grid)


def test_the_help_lists_every_option_it_listed_before():
    options = {s for a in _train_parser()._actions for s in a.option_strings}
    assert OPTIONS_BEFORE <= options
    # and now every learner and network setting, e.g. SAC's
    assert {"--gamma", "--tau", "--planner-lr", "--critic-lr", "--kl-weight", "--critic-channels"} <= options
    help_text = _train_parser().format_help()
    assert "(default: 0.9)" in help_text and "(default: 16 32 32 32)" in help_text


def test_every_registration_hyper_parameter_is_an_option_with_its_one_default():
    network, training = _configs("--synthetic", "32", "32")
    # the network's NCC-gradient feature uses the loss's window; no pair has a known field here
    assert network == SPACConfig(grid=(32, 32), prior_window=training.ncc_window)
    assert training == dataclasses.replace(SPACTrainConfig(), field_weight=0.0)
    network, training = _configs("--synthetic", "64", "64", "--channels", "8", "16", "--plan-dim", "6",
                                 "--zero-mean-step", "--features", "ncc-gradient", "--prior-scale", "1.5",
                                 "--ncc-window", "5", "--batch", "3", "--gamma", "0.8", "--grad-clip", "2", "--bf16",
                                 grid=(64, 64))
    assert network == SPACConfig(grid=(64, 64), channels=(8, 16), plan_dim=6, zero_mean=True,
                                 features="ncc-gradient", prior_scale=1.5, prior_window=5)
    assert (training.batch_pairs, training.gamma, training.grad_clip, training.bf16, training.ncc_window) == (
        3, 0.8, 2.0, True, 5)


def test_the_defaults_that_depend_on_the_data_or_another_option():
    assert _configs("--synthetic", "32", "32", "32", grid=(32, 32, 32))[0].plan_dim == 64  # 3D: as official SPAC
    assert _configs("--synthetic", "32", "32", "32", "--plan-dim", "8", grid=(32, 32, 32))[0].plan_dim == 8
    synthseg = ("--synthseg", "d")
    weights = [(t.ncc_weight, t.dice_weight, t.field_weight) for _, t in (
        _configs(*synthseg), _configs(*synthseg, "--cross-contrast"), _configs(*synthseg, "--known-pairs", "0.5"),
        _configs(*synthseg, "--cross-contrast", "--ncc-weight", "0.3", "--dice-weight", "0"),
        _configs(*synthseg, "--known-pairs", "0.5", "--field-weight", "2"), _configs(*synthseg, "--field-weight", "2"))]
    assert weights == [(1.0, 1.0, 0.0), (0.0, 1.0, 0.0), (1.0, 1.0, 1.0), (0.3, 0.0, 0.0), (1.0, 1.0, 2.0),
                       (1.0, 1.0, 0.0)]
    _, training = _configs("--synthetic", "32", "32", "--unroll", "3", "--train-max-step", "0.5")
    assert (training.test_max_step, training.val_steps) == (0.5, 20)  # the training rollout's clamp and depth
    _, training = _configs("--synthetic", "32", "32", "--unroll", "3", "--test-max-step", "2", "--val-steps", "5")
    assert (training.test_max_step, training.val_steps) == (2.0, 5)


@pytest.mark.parametrize("argv, words", [
    (["--unroll", "9"], "longer than an episode"),
    (["--unroll", "-1"], "--unroll must be >= 0"),
    (["--val-steps", "0"], "--val-steps must be >= 1"),
    (["--prior-scale", "1"], "Invalid network settings: prior_scale"),
])
def test_bad_settings_are_input_errors(argv, words):
    from steprl.errors import InputError

    with pytest.raises(InputError, match=words):
        _configs("--synthetic", "32", "32", *argv)


def test_the_learner_settings_are_stored_whole():
    """Every setting is stored, default or not (no "absent = original" shims), so a resume compares them all."""
    stored = SPACTrainConfig().to_dict()
    assert list(stored) == [f.name for f in dataclasses.fields(SPACTrainConfig)]
    config = {"method": "spac", "network": SPACConfig().to_dict(), "training": stored}
    assert missing_settings(config) == []
    older = {**config, "training": {k: v for k, v in stored.items() if k != "bf16"},
             "network": {k: v for k, v in config["network"].items() if not k.startswith("prior_")}}
    assert missing_settings(older) == ["network.prior_scale", "network.prior_window", "network.prior_sigma",
                                       "network.prior_iterations", "training.bf16"]


def test_the_feature_table_matches_the_choices():
    assert tuple(FEATURE_CHANNELS) == typing.get_args(Features)


def test_the_registration_command_line_does_not_import_torch():
    code = textwrap.dedent(
        """
        import sys
        from steprl.cli import build_parser
        args = build_parser().parse_args(["train", "registration", "--synthetic", "8", "8", "--out", "x"])
        from steprl.registration.training import registration_configs
        registration_configs(args, (16, 16))
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
