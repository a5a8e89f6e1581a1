"""Warm starts of segmentation training (``steprl train segmentation --init-from MODEL``), both methods.

A warm start begins with exactly the model's weights (on another grid too), refuses a model of
another layout, method or task with one clear line, carries the model's training record into the
new card run after run, and gives way to the checkpoint when the run resumes. The training-record
tools (trainer/tools/training_record.py, bundle_model.py) read segmentation runs too.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_support import assert_one_error
from steprl import modelfile
from steprl.cli import main
from steprl.errors import ModelFileError
from steprl.segmentation.data import SyntheticSliceSource
from steprl.segmentation.training import build_learner
from steprl.training.distributed import single_process

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTHS = (4, 8, 16, 32)
#: Tiny networks of both methods, as ``build_learner`` settings and as command-line options.
SETTINGS = {"pixeldrl": {"widths": WIDTHS, "t_max": 2}, "unet": {"unet_channels": (4, 8)}}
OPTIONS = {"pixeldrl": ["--widths", *map(str, WIDTHS), "--t-max", "2"], "unet": ["--unet-channels", "4", "8"]}


def _learner(method: str, size: int = 32, **settings):
    source = SyntheticSliceSource((size, size), seed=1, val_count=2)
    return build_learner(method, source, single_process("cpu"), batch=2, iterations_per_epoch=1,
                         **{**SETTINGS[method], **settings})


def _model(method: str, folder: Path, **settings) -> Path:
    """A model file of a tiny learner after one update, its card as training writes it after epoch 1."""
    learner, _ = _learner(method, **settings)
    learner.train_iteration(0)
    state, card = learner.export_model()
    card["training"].update(epoch=1, global_step=1, validation={"score": 0.5})
    return modelfile.save_model(folder / f"{method}_stage1", state, card)


def _train(out: Path, *extra: str, size: int = 32, epochs: int = 1, method: str = "pixeldrl") -> int:
    return main(["train", "segmentation", "--synthetic", str(size), str(size), "--method", method, "--out", str(out),
                 "--epochs", str(epochs), "--iterations", "1", "--batch", "2", "--val-slices", "2", "--quiet",
                 "--no-tensorboard", "--device", "cpu", *OPTIONS[method], *extra])


def _card(run: Path) -> dict:
    return json.loads((run / "model_last.json").read_text())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """One epoch of a tiny PixelDRL-MG on 32 x 32 synthetic slices, from scratch."""
    out = tmp_path_factory.mktemp("warm") / "first"
    assert _train(out) == 0
    return out


@pytest.mark.parametrize("method", ["pixeldrl", "unet"])
def test_a_warm_start_begins_with_the_models_weights_on_another_grid(method, tmp_path):
    path = _model(method, tmp_path)
    saved, _ = modelfile.load_model(path)
    learner, config = _learner(method, size=24, init_from=path)  # another grid: fully convolutional networks
    ours = learner.net.state_dict()
    assert ours.keys() == saved.keys() and all(torch.equal(ours[k], saved[k]) for k in saved)
    assert config["data"]["init_from"] == str(path) and config["data"]["size"] == [24, 24]
    logs = learner.train_iteration(0)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    _, card = learner.export_model()
    assert card["training"]["data"]["init_from"] == str(path)
    [earlier] = card["training"]["earlier_runs"]
    assert earlier["global_step"] == 1 and earlier["validation"] == {"score": 0.5} and earlier["device"] == "cpu"
    assert earlier["cpu_hours"] >= 0 and card["training"]["cpu_hours"] >= 0


def test_another_layout_method_or_task_is_refused_naming_what_differs(tmp_path):
    pixeldrl, unet = _model("pixeldrl", tmp_path), _model("unet", tmp_path)
    with pytest.raises(ModelFileError, match=r"widths: \[4, 8, 16, 32\] there, \[8, 16, 32, 64\] here.*--widths"):
        _learner("pixeldrl", widths=(8, 16, 32, 64), init_from=pixeldrl)
    with pytest.raises(ModelFileError, match="fusion: 'late' there, 'input' here"):
        _learner("pixeldrl", fusion="input", init_from=pixeldrl)
    with pytest.raises(ModelFileError, match=r"channels: \[4, 8\] there, \[4, 8, 16\] here.*--unet-channels"):
        _learner("unet", unet_channels=(4, 8, 16), init_from=unet)
    with pytest.raises(ModelFileError, match="is a unet model, but this run trains pixeldrl-mg.*--method unet"):
        _learner("pixeldrl", init_from=unet)
    with pytest.raises(ModelFileError, match="is a pixeldrl-mg model, but this run trains unet.*--method pixeldrl-mg"):
        _learner("unet", init_from=pixeldrl)
    from steprl.registration.networks import SPACConfig, SPACPolicy

    spac = SPACConfig(ndim=2, grid=(32, 32), channels=(8, 16), plan_dim=4, critic_channels=(4, 4))
    registration = modelfile.save_model(tmp_path / "spac", SPACPolicy(spac).state_dict(),
                                        {"method": "spac", "ndim": 2, "config": spac.to_dict()})
    with pytest.raises(ModelFileError, match="spac model"):
        _learner("pixeldrl", init_from=registration)


def test_the_command_refuses_another_layout_in_one_line_before_training(first_run, tmp_path, capsys):
    out = tmp_path / "refused"
    code = _train(out, "--init-from", str(first_run / "model_last.safetensors"), "--fusion", "input")
    assert_one_error(code, capsys.readouterr().err, ["another network layout", "fusion", "--fusion"], exit_code=3)
    assert not (out / "checkpoints" / "last.safetensors").exists()


def test_the_card_carries_every_earlier_run(first_run, tmp_path):
    second, third = tmp_path / "second", tmp_path / "third"
    assert _train(second, "--init-from", str(first_run / "model_last.safetensors"), size=24) == 0
    assert _train(third, "--init-from", str(second / "model_best.safetensors"), size=24) == 0
    first_card, second_card, third_card = _card(first_run), _card(second), _card(third)
    assert "earlier_runs" not in first_card["training"]
    assert [r["command"] for r in third_card["training"]["earlier_runs"]] == [first_card["training"]["command"],
                                                                              second_card["training"]["command"]]
    for earlier, card in zip(third_card["training"]["earlier_runs"], (first_card, second_card)):
        assert earlier["global_step"] == card["training"]["global_step"] == 1
        assert earlier["cpu_hours"] == card["training"]["cpu_hours"] and earlier["device"] == "cpu"
    config = json.loads((third / "config.json").read_text())["config"]
    assert config["data"]["init_from"] == str(second / "model_best.safetensors")
    assert third_card["inference"]["size"] == [24, 24]


def test_a_resumed_run_continues_its_checkpoint_not_the_model(first_run, tmp_path):
    """The model file is replaced by other weights between the epochs: the resumed run must not notice."""
    start = tmp_path / "start.safetensors"
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(first_run / f"model_last{suffix}", start.with_suffix(suffix))
    assert _train(tmp_path / "straight", "--init-from", str(start), epochs=2) == 0
    assert _train(tmp_path / "resumed", "--init-from", str(start), epochs=1) == 0
    other = tmp_path / "other"
    assert _train(other, "--seed", "7") == 0
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(other / f"model_last{suffix}", start.with_suffix(suffix))
    assert _train(tmp_path / "resumed", "--init-from", str(start), epochs=2) == 0
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "model_last.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model_last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight, resumed = _card(tmp_path / "straight"), _card(tmp_path / "resumed")
    assert resumed["training"]["global_step"] == 2
    assert resumed["training"]["earlier_runs"] == straight["training"]["earlier_runs"]  # the first model's record


def test_the_record_tools_read_a_segmentation_run_and_bundle_a_snapshot(first_run, tmp_path, monkeypatch, repo_root):
    tools = repo_root / "trainer" / "tools"
    monkeypatch.syspath_prepend(str(tools))
    record_tool, bundle_tool = importlib.import_module("training_record"), importlib.import_module("bundle_model")
    committed = record_tool.RESULTS / "training_record_spac3d_brain.md"  # registration records render as before
    assert record_tool.render(record_tool.load("spac3d_brain")) == committed.read_text(encoding="utf-8")
    monkeypatch.setattr(record_tool, "RESULTS", tmp_path / "results")

    run = tmp_path / "wm"
    assert _train(run, "--init-from", str(first_run / "model_last.safetensors"), size=24) == 0
    assert record_tool.main(["add", str(first_run), "--name", "wm_test"]) == 0
    assert record_tool.main(["add", str(run), "--name", "wm_test", "--note", "validated on T1 only"]) == 0
    assert record_tool.main(["add", str(run), "--name", "wm_test"]) == 0  # re-added: the note stays
    record = json.loads((tmp_path / "results" / "training_record_wm_test.json").read_text())
    assert [r["method"] for r in record["runs"]] == ["pixeldrl-mg", "pixeldrl-mg"]
    assert [r["updates"] for r in record["runs"]] == [1, 1] and record["runs"][1]["grid"] == [24, 24]
    assert record["runs"][1]["init_from"] == str(first_run / "model_last.safetensors")
    text = (tmp_path / "results" / "training_record_wm_test.md").read_text()
    assert "| run | updates (cumulative) | step 1 | last step | best step |" in text and "| 2 | wm | 24x24 |" in text
    assert "- wm: validated on T1 only" in text and record["runs"][1]["note"] == "validated on T1 only"

    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"licence_of_weights": "test data, no licence needed"}))
    snapshots = tmp_path / "snapshots"
    assert bundle_tool.main([str(run), "wm_warmstart", "--card-extra", str(extra), "--which", "last",
                             "--to", str(snapshots), "--training-record", "wm_test"]) == 0
    snapshot = snapshots / "wm_warmstart.safetensors"
    _, card = modelfile.load_model(snapshot, method="pixeldrl-mg")
    assert [r["run"] for r in card["training"]["record"]["runs"]] == [first_run.name, "wm"]
    assert card["training"]["record"]["runs"][1]["note"] == "validated on T1 only"  # the record's notes travel too
    assert "note" not in card["training"]["record"]["runs"][0]
    assert card["training"]["record"]["total_updates"] == 2 and len(card["training"]["earlier_runs"]) == 1
    learner, _ = _learner("pixeldrl", init_from=snapshot)  # the snapshot warm-starts the next run
    assert len(learner.earlier_runs) == 2


def test_a_half_snapshot_is_half_the_file_and_segments_as_the_run(first_run, tmp_path, monkeypatch, repo_root):
    """``bundle_model.py --half``: float16 weights on disk, a card that says so and verifies, the same
    network once loaded (float32, within float16 rounding) and the same masks on a test image."""
    import numpy as np
    from steprl.geometry import Geometry, Image
    from steprl.segmentation.inference import segment
    from steprl.segmentation.model import load_segmenter

    monkeypatch.syspath_prepend(str(repo_root / "trainer" / "tools"))
    bundle_tool = importlib.import_module("bundle_model")
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"licence_of_weights": "test data, no licence needed"}))
    assert bundle_tool.main([str(first_run), "half", "--card-extra", str(extra), "--to", str(tmp_path), "--half"]) == 0
    full, half = first_run / "model_best.safetensors", tmp_path / "half.safetensors"
    state, card = modelfile.load_model(half, method="pixeldrl-mg")
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    assert "float16" in card["weights_stored_as"] and half.stat().st_size < 0.6 * full.stat().st_size
    original, loaded = load_segmenter(full), load_segmenter(half)
    for (name, a), b in zip(original.net.state_dict().items(), loaded.net.state_dict().values(), strict=True):
        assert b.dtype == torch.float32, name
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-7)
    rng = np.random.default_rng(0)
    image = Image(rng.random((3, 32, 32)).astype(np.float32), Geometry((3, 32, 32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                                                                      np.eye(3)))
    masks = [list(segment(image, m, 2, "cpu", match_levels=False))[-1].mask.array for m in (original, loaded)]
    assert np.mean(masks[0] != masks[1]) < 0.01


def test_the_bundled_model_warm_starts_by_name_with_its_options():
    """``--init-from pixeldrl_wm`` with the network options of its card (``steprl info pixeldrl_wm``)."""
    from steprl.segmentation.model import load_segmenter

    bundled = load_segmenter("pixeldrl_wm")
    config = bundled.card["config"]
    learner, _ = _learner("pixeldrl", widths=tuple(config["widths"]), fusion_width=config["fusion_width"],
                          init_from="pixeldrl_wm")
    theirs, ours = bundled.net.state_dict(), learner.net.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert learner.earlier_runs[-1]["command"] == bundled.card["training"]["command"]
    with pytest.raises(ModelFileError, match="widths"):
        _learner("pixeldrl", widths=(32, 64, 128, 256), init_from="pixeldrl_wm")
