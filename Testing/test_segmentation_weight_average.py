"""The weight average of segmentation training (``steprl train segmentation --ema-decay D``), both methods.

With it, validation scores and the model file holds an exponential moving average of the
weights (training still rolls out the latest ones); it starts at a warm start's weights, survives
a resume inside the checkpoint, and leaves the config of a run without it as it was, so runs begun
before the option existed still resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_support import assert_one_error
from steprl import modelfile
from steprl.cli import main
from steprl.segmentation.config import SegTrainConfig
from steprl.segmentation.data import SyntheticSliceSource
from steprl.segmentation.training import build_learner
from steprl.training.distributed import single_process

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = {"pixeldrl": {"widths": (4, 8, 16, 32), "t_max": 2}, "unet": {"unet_channels": (4, 8)}}


def _learner(method: str, **settings):
    source = SyntheticSliceSource((32, 32), seed=1, val_count=2)
    learner, _ = build_learner(method, source, single_process("cpu"), batch=2, iterations_per_epoch=1,
                               **{**SETTINGS[method], **settings})
    return learner


@pytest.mark.parametrize("method", ["pixeldrl", "unet"])
def test_the_model_file_holds_the_average_not_the_latest_weights(method):
    decay = 0.5
    learner = _learner(method, ema_decay=decay, lr=1e-2)
    history = []
    for i in range(3):
        learner.train_iteration(i)
        history.append({k: v.detach().clone() for k, v in learner.net.state_dict().items()})
    state, card = learner.export_model()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    # first update: the average is the weights; then avg <- decay avg + (1 - decay) weights
    expected = history[0][name]
    for weights in history[1:]:
        expected = decay * expected + (1 - decay) * weights[name]
    assert torch.allclose(state[name], expected, atol=1e-6)
    assert not torch.allclose(state[name], history[-1][name])  # not the latest weights
    assert card["training"]["ema_decay"] == decay


def test_without_the_option_the_latest_weights_and_an_unchanged_config():
    learner = _learner("pixeldrl")
    learner.train_iteration(0)
    state, card = learner.export_model()
    assert all(torch.equal(state[k], v) for k, v in learner.net.state_dict().items())
    assert "ema" not in learner.modules and "ema_decay" not in card["training"]
    assert "ema_decay" not in SegTrainConfig().to_dict() and SegTrainConfig(ema_decay=0.9).to_dict()["ema_decay"] == 0.9


def test_the_average_starts_at_a_warm_starts_weights(tmp_path):
    first = _learner("pixeldrl", lr=1e-2)
    first.train_iteration(0)
    state, card = first.export_model()
    card["training"].update(epoch=1, global_step=1, validation={"score": 0.5})
    path = modelfile.save_model(tmp_path / "stage1", state, card)
    learner = _learner("pixeldrl", ema_decay=0.99, init_from=path)
    averaged = learner.judged_net.state_dict()
    assert all(torch.equal(averaged[k], v) for k, v in state.items())


def _train(out: Path, epochs: int, *extra: str) -> int:
    return main(["train", "segmentation", "--synthetic", "32", "32", "--out", str(out), "--epochs", str(epochs),
                 "--iterations", "2", "--batch", "2", "--val-slices", "2", "--quiet", "--no-tensorboard",
                 "--device", "cpu", "--widths", "4", "8", "16", "32", "--t-max", "2", "--lr", "1e-2", *extra])


def test_a_resumed_run_goes_on_averaging_as_an_uninterrupted_one(tmp_path):
    assert _train(tmp_path / "whole", 2, "--ema-decay", "0.9") == 0
    assert _train(tmp_path / "parts", 1, "--ema-decay", "0.9") == 0
    assert _train(tmp_path / "parts", 2, "--ema-decay", "0.9") == 0
    whole, _ = modelfile.load_model(tmp_path / "whole" / "model_last")
    parts, card = modelfile.load_model(tmp_path / "parts" / "model_last")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert card["training"]["ema_decay"] == 0.9
    history = [json.loads(line) for line in (tmp_path / "parts" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]


@pytest.mark.parametrize("decay", ["1", "-0.1"])
def test_a_decay_outside_zero_to_one_is_refused_in_one_line(tmp_path, capsys, decay):
    code = _train(tmp_path / "bad", 1, f"--ema-decay={decay}")
    assert_one_error(code, capsys.readouterr().err, ["--ema-decay must be in [0, 1)", "0.99"])
    assert not (tmp_path / "bad" / "model_last.safetensors").exists()
