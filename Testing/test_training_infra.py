"""Tests of steprl.device and steprl.training (checkpoint, distributed, loop) with a toy learner."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from steprl import device as sdevice
from steprl import modelfile
from steprl.atomic import TEMP_PREFIX
from steprl.errors import CheckpointError, InputError
from steprl.training import checkpoint as ckpt
from steprl.training import distributed as tdist
from steprl.training.loop import fit
from torch import nn
from toy_ddp_train import ToyLearner, seed_rank, weights_hash

HERE = Path(__file__).resolve().parent
CONFIG = {"lr": 0.05, "batch": 16}


def _fit(learner: ToyLearner, out: Path, epochs: int, **kwargs):
    kwargs.setdefault("config", {**CONFIG, "epochs": epochs})  # "epochs" may grow on resume
    kwargs.setdefault("tensorboard", False)
    return fit(learner, out, epochs=epochs, iterations_per_epoch=4, progress=False, **kwargs)


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def _straight_hash(tmp_path: Path, epochs: int, seed: int) -> str:
    seed_rank(seed, 0)
    learner = ToyLearner()
    _fit(learner, tmp_path / f"straight{epochs}", epochs)
    return weights_hash(learner.net)


# ------------------------------------------------------------------------------------- loop
def test_resume_continues_bit_identically(tmp_path):
    seed_rank(3, 0)
    straight = ToyLearner()
    result = _fit(straight, tmp_path / "a", 3)
    assert result.epochs_done == 3

    seed_rank(3, 0)
    first = ToyLearner()
    _fit(first, tmp_path / "b", 2)
    seed_rank(12345, 0)  # the checkpoint's RNG states must override this seed
    second = ToyLearner()
    resumed = _fit(second, tmp_path / "b", 3)

    assert weights_hash(second.net) == weights_hash(straight.net)
    assert second.train_calls == 4  # only epoch 3 was trained
    assert second.updates == 12  # learner scalars restored from the checkpoint
    assert second.optimizers["adam"].param_groups[0]["lr"] == straight.optimizers["adam"].param_groups[0]["lr"]
    history_a, history_b = _history(tmp_path / "a"), _history(tmp_path / "b")
    assert [h["epoch"] for h in history_b] == [1, 2, 3]
    assert [h["validation"] for h in history_b] == [h["validation"] for h in history_a]
    assert resumed.best_score == result.best_score and resumed.best_epoch == result.best_epoch


def test_outputs_exist_load_and_are_consistent(tmp_path):
    seed_rank(4, 0)
    learner = ToyLearner()
    out = tmp_path / "run"
    result = _fit(learner, out, 2, tensorboard=True)

    history = _history(out)
    scores = [h["validation"]["score"] for h in history]
    assert result.best_score == max(scores) and result.best_epoch == 1 + scores.index(max(scores))
    assert set(history[0]["train"]) == {"loss", "noise"}
    saved_config = json.loads((out / "config.json").read_text())
    assert saved_config["config"]["lr"] == CONFIG["lr"]
    assert saved_config["fit"]["iterations_per_epoch"] == 4
    assert any((out / "tensorboard").iterdir())

    for name in ("model_last", "model_best"):
        state, card = modelfile.load_model(out / f"{name}.safetensors", method="toy", ndim=2)
        net = nn.Linear(card["config"]["dim"], 1)
        modelfile.check_state_dict(net, state, out / name)
        assert "epoch" in card["training"]
    last_state, _ = modelfile.load_model(out / "model_last")
    assert torch.equal(last_state["weight"], learner.net.weight)

    for name, epoch in (("last", 2), ("best", result.best_epoch)):
        fresh = ToyLearner()
        state = ckpt.load_checkpoint(out / "checkpoints" / f"{name}.safetensors", fresh.modules, fresh.optimizers)
        assert state["epoch"] == epoch
        assert state["learner"]["updates"] == 4 * epoch
        model_state, _ = modelfile.load_model(out / f"model_{name}")
        assert torch.equal(model_state["weight"], fresh.net.weight)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(f"{TEMP_PREFIX}*"))


def test_finished_run_is_not_trained_again(tmp_path):
    seed_rank(5, 0)
    _fit(ToyLearner(), tmp_path, 2)
    again = ToyLearner()
    result = _fit(again, tmp_path, 2)
    assert again.train_calls == 0
    assert result.epochs_done == 2 and result.best_epoch >= 1
    assert len(_history(tmp_path)) == 2


def test_config_change_refuses_to_resume(tmp_path):
    seed_rank(6, 0)
    _fit(ToyLearner(), tmp_path, 1)
    with pytest.raises(CheckpointError, match="another configuration") as info:
        _fit(ToyLearner(), tmp_path, 2, config={**CONFIG, "lr": 0.1})
    assert "lr" in str(info.value)
    with pytest.raises(CheckpointError, match="iterations_per_epoch"):
        fit(ToyLearner(), tmp_path, epochs=2, iterations_per_epoch=5, config=CONFIG, progress=False,
            tensorboard=False)


def test_interrupted_checkpoint_write_keeps_previous_one(tmp_path, monkeypatch):
    seed_rank(8, 0)
    out = tmp_path / "run"
    _fit(ToyLearner(), out, 1)
    last = out / "checkpoints" / "last.safetensors"
    before = last.read_bytes()

    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("last.safetensors"):
            raise OSError("simulated crash while writing")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        _fit(ToyLearner(), out, 2)
    monkeypatch.setattr(os, "replace", real_replace)

    assert last.read_bytes() == before
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(f"{TEMP_PREFIX}*"))
    assert ckpt.read_checkpoint_state(last)["epoch"] == 1
    # The epoch whose commit failed is redone, and the outcome is the uninterrupted one.
    learner = ToyLearner()
    _fit(learner, out, 2)
    assert weights_hash(learner.net) == _straight_hash(tmp_path, 2, seed=8)
    assert [h["epoch"] for h in _history(out)] == [1, 2]


class _InterruptedLearner(ToyLearner):
    def train_iteration(self, iteration: int) -> dict[str, float]:
        if iteration == 5:
            raise KeyboardInterrupt
        return super().train_iteration(iteration)


def test_keyboard_interrupt_keeps_last_finished_epoch(tmp_path, caplog):
    seed_rank(9, 0)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        _fit(_InterruptedLearner(), tmp_path, 3)
    assert ckpt.read_checkpoint_state(tmp_path / "checkpoints" / "last.safetensors")["epoch"] == 1
    assert len(_history(tmp_path)) == 1
    assert "resume" in caplog.text
    learner = ToyLearner()
    assert _fit(learner, tmp_path, 3).epochs_done == 3
    assert learner.train_calls == 8


def test_missing_tensorboard_warns_and_continues(tmp_path, monkeypatch, caplog):
    from steprl.training import loop

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    monkeypatch.setattr(loop, "_tensorboard_warned", False)
    seed_rank(10, 0)
    with caplog.at_level(logging.WARNING):
        result = _fit(ToyLearner(), tmp_path, 1, tensorboard=True)
    assert result.epochs_done == 1
    assert "tensorboard is not installed" in caplog.text


# ------------------------------------------------------------------------------- checkpoint
def _toy_modules(width: int = 1):
    net = nn.Linear(3, width)
    opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.8, 0.9))
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    return {"net": net}, {"opt": opt}


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    modules, optimizers = _toy_modules()
    path = tmp_path / "c.safetensors"
    ckpt.save_checkpoint(path, modules, optimizers, {"epoch": 4, "best_score": float("-inf")},
                         extra_tensors={"buffer": torch.arange(5)})
    expected_next = torch.rand(3)
    torch.manual_seed(99)

    new_modules, new_optimizers = _toy_modules()
    state = ckpt.load_checkpoint(path, new_modules, new_optimizers)
    assert state["epoch"] == 4 and state["best_score"] == float("-inf")
    assert torch.equal(state["extra_tensors"]["buffer"], torch.arange(5))
    assert torch.equal(new_modules["net"].weight, modules["net"].weight)
    restored = new_optimizers["opt"].state_dict()
    original = optimizers["opt"].state_dict()
    assert restored["param_groups"][0]["betas"] == (0.8, 0.9)
    assert torch.equal(restored["state"][0]["exp_avg_sq"], original["state"][0]["exp_avg_sq"])
    assert torch.equal(torch.rand(3), expected_next)  # torch RNG restored


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    modules, optimizers = _toy_modules()
    path = tmp_path / "c.safetensors"
    ckpt.save_checkpoint(path, modules, optimizers, {"epoch": 1})

    wide, wide_opt = _toy_modules(width=2)
    before = wide["net"].weight.clone()
    with pytest.raises(CheckpointError, match="another configuration") as info:
        ckpt.load_checkpoint(path, wide, wide_opt)
    assert "net.weight" in str(info.value)
    assert torch.equal(wide["net"].weight, before)  # nothing was modified

    with pytest.raises(CheckpointError, match="another configuration"):
        ckpt.load_checkpoint(path, {"other": modules["net"]}, optimizers)


def test_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 7)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    modules, optimizers = _toy_modules()
    for path, message in ((garbage, "corrupt"), (foreign, "not a StepRL"), (tmp_path / "none", "does not exist")):
        with pytest.raises(CheckpointError, match=message):
            ckpt.load_checkpoint(path, modules, optimizers)


# ------------------------------------------------------------------------------ distributed
def test_single_process_distributed_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = tdist.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.device.type) == (0, 1, True, "cpu")
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, 3.0])
    tdist.average_gradients([p])
    assert p.grad.tolist() == [1.0, 3.0]
    assert tdist.all_reduce_mean(2.5) == 2.5
    assert tdist.all_gather_bytes(b"abc") == [b"abc"]
    assert tdist.all_agree(3)


def test_torchrun_two_processes_train_identically(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "toy_ddp_train.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    reports = [json.loads((tmp_path / f"rank{r}.txt").read_text()) for r in (0, 1)]
    assert reports[0]["world_size"] == 2
    assert reports[0]["straight"] == reports[1]["straight"]  # ranks stayed in sync
    assert reports[0]["resumed"] == reports[0]["straight"] == reports[1]["resumed"]  # bit-exact DDP resume
    for r in reports:
        assert r["grads"] == {"a": [2.0, 2.0, 2.0], "b": None, "c": [0.5, 0.5], "mean_rank": 0.5}

    out = tmp_path / "straight"
    state, _ = modelfile.load_model(out / "model_last", method="toy", ndim=2)
    learner = ToyLearner()
    saved = ckpt.load_checkpoint(out / "checkpoints" / "last.safetensors", learner.modules, learner.optimizers,
                                 restore_rng=False)
    assert saved["world_size"] == 2 and saved["epoch"] == 3
    assert weights_hash(learner.net) == reports[0]["straight"]
    assert torch.equal(state["weight"], learner.net.weight)
    from safetensors import safe_open

    with safe_open(str(out / "checkpoints" / "last.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"rng.0.torch", "rng.1.torch"} <= keys  # one RNG stream per rank


# ----------------------------------------------------------------------------------- device
def test_resolve_device():
    assert sdevice.resolve_device("cpu") == torch.device("cpu")
    assert sdevice.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="Unknown device"):
        sdevice.resolve_device("tpu")
    if not torch.cuda.is_available():
        for name in ("cuda", "gpu", "cuda:1"):
            with pytest.raises(InputError, match="CUDA is not available"):
                sdevice.resolve_device(name)
    else:
        with pytest.raises(InputError, match="CUDA device"):
            sdevice.resolve_device(f"cuda:{torch.cuda.device_count()}")
    labels = sdevice.describe_devices()
    assert labels[0].startswith("CPU (") and len(labels) == 1 + torch.cuda.device_count()


def test_autocast_policy():
    a = torch.randn(4, 4)
    with sdevice.autocast("cpu"):
        assert (a @ a).dtype == torch.float32  # off by default on CPU
    with sdevice.autocast("cpu", enabled=True):
        assert (a @ a).dtype == torch.bfloat16
        with sdevice.autocast("cpu", enabled=False):
            assert (a @ a).dtype == torch.float32


def test_seed_everything_is_reproducible():
    import random

    import numpy as np

    sdevice.seed_everything(11)
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    sdevice.seed_everything(11)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first
