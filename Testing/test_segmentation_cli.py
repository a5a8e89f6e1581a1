"""The segmentation command line: train (both methods, resume), segment (all outputs), evaluate, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from steprl.cli import main
from steprl.synth.toy import write_segmentation_dataset

TINY = ["--widths", "4", "8", "16", "32"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four 3D noisy-ellipse cases, 6 x 28 x 24 voxels of 1.1 x 0.9 x 2.0 mm."""
    return write_segmentation_dataset(tmp_path_factory.mktemp("seg3d"), 4, (6, 28, 24), seed=3,
                                      spacing=(1.1, 0.9, 2.0))


@pytest.fixture(scope="module")
def trained_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pixeldrl"
    code = main(["train", "segmentation", "--images", str(dataset / "images"), "--labels", str(dataset / "labels"),
                 "--out", str(out), "--epochs", "1", "--iterations", "2", "--batch", "2", "--size", "24", "24",
                 "--t-max", "3", "--val-slices", "4", "--quiet", "--no-tensorboard", "--device", "cpu", *TINY])
    assert code == 0
    return out


def test_train_writes_models_and_resumes(trained_run, dataset, capsys):
    out = trained_run
    for name in ("model_best.safetensors", "model_best.json", "model_last.safetensors", "history.jsonl",
                 "checkpoints/last.safetensors", "config.json"):
        assert (out / name).is_file(), name
    card = json.loads((out / "model_best.json").read_text())
    assert card["method"] == "pixeldrl-mg" and card["ndim"] == 2 and card["inference"]["size"] == [24, 24]
    assert card["inference"]["steps"] == 3 and card["config"]["fusion"] == "late"
    assert card["training"]["data"]["validation_cases"] == 1 and card["training"]["data"]["object"] == "labels > 0"
    assert card["normalisation"]["kind"] == "percentile"
    # asking for one more epoch continues from the checkpoint
    code = main(["train", "segmentation", "--images", str(dataset / "images"), "--labels", str(dataset / "labels"),
                 "--out", str(out), "--epochs", "2", "--iterations", "2", "--batch", "2", "--size", "24", "24",
                 "--t-max", "3", "--val-slices", "4", "--quiet", "--no-tensorboard", "--device", "cpu", *TINY])
    assert code == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and history[1]["global_step"] == 4
    # other settings on the same folder: refused with a clear message
    code = main(["train", "segmentation", "--images", str(dataset / "images"), "--labels", str(dataset / "labels"),
                 "--out", str(out), "--epochs", "3", "--iterations", "2", "--batch", "3", "--size", "24", "24",
                 "--t-max", "3", "--val-slices", "4", "--quiet", "--no-tensorboard", "--device", "cpu", *TINY])
    assert code != 0 and "settings differ" in capsys.readouterr().err


def test_train_unet_and_synthetic(tmp_path):
    out = tmp_path / "unet"
    code = main(["train", "segmentation", "--synthetic", "32", "32", "--method", "unet", "--unet-channels", "4", "8",
                 "--out", str(out), "--epochs", "1", "--iterations", "2", "--batch", "2", "--val-slices", "2",
                 "--quiet", "--no-tensorboard", "--device", "cpu"])
    assert code == 0
    card = json.loads((out / "model_best.json").read_text())
    assert card["method"] == "unet" and card["config"]["channels"] == [4, 8]
    assert card["training"]["data"]["kind"] == "synthetic noisy ellipses"


def test_segment_writes_every_output_with_the_input_geometry(trained_run, dataset, tmp_path, capsys):
    image = dataset / "images" / "case_000.nii.gz"
    labels = dataset / "labels" / "case_000.nii.gz"
    out = tmp_path / "seg"
    code = main(["segment", str(image), "--model", str(trained_run / "model_best.safetensors"), "--out", str(out),
                 "--labels", str(labels), "--format", "nrrd", "--quiet", "--device", "cpu"])
    assert code == 0
    assert "Dice" in capsys.readouterr().out
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == [".steprl-outputs.json", "labelmap.nrrd", "metrics.json", "steps.png", "steps/mask_step_001.nrrd",
                     "steps/mask_step_002.nrrd", "steps/mask_step_003.nrrd"]
    written, source = sitk.ReadImage(str(out / "labelmap.nrrd")), sitk.ReadImage(str(image))
    assert written.GetSize() == source.GetSize()
    assert np.allclose(written.GetSpacing(), source.GetSpacing())
    assert np.allclose(written.GetOrigin(), source.GetOrigin())
    assert np.allclose(written.GetDirection(), source.GetDirection())
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["final"]) >= {"dice", "ppv", "sen", "iou", "biou", "hd95"}
    assert [s["step"] for s in metrics["steps"]] == [0, 1, 2, 3] and "dice" in metrics["steps"][0]
    assert not list(tmp_path.glob(".seg.partial-*"))  # the staging folder is gone
    # a later run with fewer steps leaves no stale step mask behind
    assert main(["segment", str(image), "--model", str(trained_run / "model_best.safetensors"), "--out", str(out),
                 "--steps", "1", "--quiet", "--device", "cpu", "--format", "nrrd"]) == 0
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["mask_step_001.nrrd"]
    assert "final" not in json.loads((out / "metrics.json").read_text())


def test_evaluate_prints_the_table(trained_run, dataset, tmp_path, capsys):
    table = tmp_path / "table.json"
    code = main(["evaluate", "segmentation", "--images", str(dataset / "images"), "--labels",
                 str(dataset / "labels"), "--model", str(trained_run / "model_best.safetensors"), "--json",
                 str(table), "--quiet", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    for column in ("Dice", "PPV", "SEN", "IoU", "BIoU", "HD95 mm", "mean"):
        assert column in printed
    rows = json.loads(table.read_text())
    assert [r["case"] for r in rows["cases"]] == [f"case_{i:03d}" for i in range(4)]
    assert 0.0 <= rows["mean"]["dice"] <= 1.0


def test_cli_errors_are_one_line_with_a_fix(trained_run, dataset, tmp_path, capsys):
    image = dataset / "images" / "case_000.nii.gz"
    # a registration model given to segment
    from steprl.modelfile import save_model
    from steprl.registration.networks import SPACConfig, SPACPolicy

    cfg = SPACConfig(ndim=2, grid=(32, 32), channels=(4, 8), plan_dim=4)
    spac = save_model(tmp_path / "spac", SPACPolicy(cfg).state_dict(), {"method": "spac", "ndim": 2,
                                                                         "config": cfg.to_dict()})
    assert main(["segment", str(image), "--model", str(spac), "--out", str(tmp_path / "x"), "--quiet"]) != 0
    assert "spac model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # a label map that cannot be brought onto the image (no overlap in physical space)
    far = sitk.ReadImage(str(dataset / "labels" / "case_000.nii.gz"))
    far.SetOrigin((900.0, 900.0, 900.0))
    sitk.WriteImage(far, str(tmp_path / "far.nii.gz"))
    assert main(["segment", str(image), "--model", str(trained_run / "model_best.safetensors"), "--out",
                 str(tmp_path / "y"), "--labels", str(tmp_path / "far.nii.gz"), "--quiet"]) != 0
    assert "overlap" in capsys.readouterr().err
    # a 2D label map for a 3D image
    flat = sitk.GetImageFromArray(np.zeros((28, 24), np.uint8))
    sitk.WriteImage(flat, str(tmp_path / "flat.nii.gz"))
    assert main(["segment", str(image), "--model", str(trained_run / "model_best.safetensors"), "--out",
                 str(tmp_path / "z"), "--labels", str(tmp_path / "flat.nii.gz"), "--quiet"]) != 0
    assert "2D" in capsys.readouterr().err
    # training without labels
    assert main(["train", "segmentation", "--images", str(dataset / "images"), "--out", str(tmp_path / "t"),
                 "--quiet"]) != 0
    assert "--labels" in capsys.readouterr().err


def test_a_run_from_before_the_config_classes_converts_once_and_resumes(trained_run, dataset, tmp_path, capsys):
    """trainer/tools/convert_segmentation_run.py: the one-off conversion of the stored settings."""
    import importlib.util
    import shutil

    path = Path(__file__).resolve().parent.parent / "trainer" / "tools" / "convert_segmentation_run.py"
    spec = importlib.util.spec_from_file_location("convert_segmentation_run", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def the_old_form(config: dict) -> dict:  # as steprl wrote it before: shims and the unused lr keys
        pa3c = {k: v for k, v in config["pa3c"].items() if v or not k.startswith("class_balance")}
        training = {k: v for k, v in config["training"].items() if k != "grad_clip" or v is not None}
        return {**config, "pa3c": {**pa3c, "lr": 1e-3, "lr_decay": 0.9, "lr_decay_every": 25}, "training": training}

    run = tmp_path / "old_run"
    shutil.copytree(trained_run, run)
    from steprl.training.checkpoint import rewrite_checkpoint_state

    for checkpoint in (run / "checkpoints").glob("*.safetensors"):
        assert rewrite_checkpoint_state(checkpoint, lambda state: {**state, "config": the_old_form(state["config"])})
    done = len((run / "history.jsonl").read_text().splitlines())
    command = ["train", "segmentation", "--images", str(dataset / "images"), "--labels", str(dataset / "labels"),
               "--out", str(run), "--epochs", str(done + 1), "--iterations", "2", "--batch", "2", "--size", "24", "24",
               "--t-max", "3", "--val-slices", "4", "--quiet", "--no-tensorboard", "--device", "cpu", *TINY]
    assert main(command) != 0 and "lr_decay" in capsys.readouterr().err  # the old settings no longer match
    assert tool.main([str(run)]) == 0
    assert "checkpoints/last.safetensors" in capsys.readouterr().out
    assert tool.convert_run(run) == []  # once is enough
    assert main(command) == 0
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, done + 2))
