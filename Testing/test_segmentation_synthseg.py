"""CI smoke test of the white-matter starter model's training: SynthSeg-synthesised slices, both methods.

A short version of the bundled ``pixeldrl_wm`` model's training command (tiny grid, one training
subject, a few updates) runs through the real CLI for PixelDRL-MG and the U-Net baseline; the
slice source itself is checked for shapes, ranges, the subject split and the skull-stripping.
Skips when ``../shared/data/synthseg`` is absent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synthseg(repo_root):
    folder = (repo_root.parent / "shared" / "data" / "synthseg").resolve()
    if not any(folder.glob("training_seg_*.nii.gz")):
        pytest.skip(f"SynthSeg label maps not found at {folder} (they live beside the repository in ../shared/data)")
    return folder


@pytest.fixture(scope="module")
def source(synthseg):
    from steprl.synth.segmentation_slices import SynthSegSliceSource

    return SynthSegSliceSource(synthseg, (32, 32), seed=0, val_slices=6, max_train_subjects=1, validation=1)


def test_source_gives_normalised_slices_with_white_matter_and_holds_test_subjects_out(source):
    batch = source.sample(5, np.random.default_rng(0))
    assert batch.images.shape == (5, 1, 32, 32) and batch.masks.shape == (5, 1, 32, 32)
    assert float(batch.images.min()) >= 0.0 and float(batch.images.max()) <= 1.0
    assert set(torch.unique(batch.masks).tolist()) <= {0.0, 1.0}
    assert float(batch.masks.sum()) > 0  # most slices hold white matter
    val = source.validation()
    assert len(val) == 6 and float(val.masks.sum()) > 0
    again = source.validation()
    assert torch.equal(val.images, again.images)  # fixed validation slices
    description = source.description
    assert set(description["test_subjects_held_out"]).isdisjoint(description["train_subjects"])
    assert set(description["test_subjects_held_out"]).isdisjoint(description["validation_subjects"])
    assert len(description["test_subjects_held_out"]) == 3
    assert "Apache-2.0" in description["licence"] and "white matter" in description["object"]


@pytest.mark.parametrize("t1_probability,expected", [(1.0, {True}), (0.0, {False}), (0.5, {True, False})])
def test_validation_draws_the_contrasts_the_training_draws(synthseg, monkeypatch, t1_probability, expected):
    """A T1-first stage is validated on T1-like slices only; a mixed one on both contrasts."""
    from steprl.synth import segmentation_slices

    drawn = []
    original = segmentation_slices.SynthSegSliceSource.synth_volume

    def spy(self, labels, rng, spacing=None, t1=None):
        drawn.append(t1)
        return original(self, labels, rng, spacing=spacing, t1=t1)

    monkeypatch.setattr(segmentation_slices.SynthSegSliceSource, "synth_volume", spy)
    source = segmentation_slices.SynthSegSliceSource(synthseg, (24, 24), seed=0, val_slices=4, max_train_subjects=1,
                                                     validation=1, t1_probability=t1_probability)
    assert set(drawn) == expected and len(source.validation()) == 4


def test_skull_strip_keeps_only_brain_labels():
    from steprl.synth.segmentation_slices import skull_strip
    from steprl.synth.synthseg import BRAIN_STRUCTURES

    labels = torch.tensor([0, 2, 41, 24, 165, 258, 3]).view(1, 1, 1, 1, 7)
    stripped = skull_strip(labels).flatten().tolist()
    assert stripped == [0, 2, 41, 24, 0, 0, 3]
    assert all(v in BRAIN_STRUCTURES or v == 0 for v in stripped)


def test_skull_strip_with_a_margin_keeps_a_rim_of_that_width_in_millimetres():
    """An imperfect extraction: non-brain labels within the margin (Euclidean, in mm) stay, the rest go."""
    from steprl.synth.segmentation_slices import skull_strip

    labels = torch.full((1, 1, 1, 9, 21), 165)  # scalp everywhere ...
    labels[..., 4, 10] = 2  # ... around one white-matter voxel
    rim = skull_strip(labels, margin_mm=4.0, spacing_mm=2.0)[0, 0, 0]
    kept = torch.nonzero(rim).tolist()
    assert [4, 10] in kept and [4, 12] in kept and [3, 11] in kept  # 4 mm and sqrt(8) mm away
    assert [4, 13] not in kept and [2, 12] not in kept  # 6 mm and sqrt(32) mm away
    assert torch.equal(skull_strip(labels, 0.0, 2.0), skull_strip(labels))  # no margin: the brain alone


@pytest.mark.parametrize("method", ["pixeldrl", "unet"])
def test_cli_trains_on_synthseg_and_the_model_segments_a_volume(synthseg, source, method, tmp_path, capsys):
    from steprl.cli import main
    from steprl.geometry import Geometry, Image
    from steprl.segmentation.inference import segment

    out = tmp_path / method
    extra = (["--widths", "4", "8", "16", "32", "--fusion-width", "8", "--t-max", "3", "--class-balance-anneal", "2",
              "--class-balance-floor", "0.3"]
             if method == "pixeldrl" else ["--unet-channels", "4", "8", "16"])
    code = main(["train", "segmentation", "--synthseg", str(synthseg), "--synth-subjects", "1", "--method", method,
                 "--size", "32", "32", "--epochs", "1", "--iterations", "2", "--batch", "2", "--val-slices", "4",
                 "--out", str(out), "--no-tensorboard", "--quiet", "--device", "cpu", *extra])
    assert code == 0
    assert "best validation Dice" in capsys.readouterr().out
    card = json.loads((out / "model_best.json").read_text())
    assert card["training"]["data"]["kind"] == "synthseg"
    assert card["labels"]["object"].startswith("labels in 2, 41")
    assert card["inference"]["size"] == [32, 32]
    if method == "pixeldrl":
        assert card["training"]["pa3c"]["class_balance_anneal"] == 2
    # the trained model runs on a synthetic 3D volume and keeps its geometry
    image, obj = source.synth_volume(source.train_labels[0], np.random.default_rng(3))
    geometry = Geometry(image.shape, (7.0, 7.0, 7.0), (1.0, 2.0, 3.0), np.eye(3))
    steps = list(segment(Image(image, geometry), out / "model_best.safetensors", steps=None, device="cpu",
                         labels=Image(obj.astype(np.uint8), geometry)))
    result = steps[-1].mask
    assert result.array.shape == image.shape and result.geometry.spacing == geometry.spacing
    assert result.geometry.origin == geometry.origin
    assert 0.0 <= steps[-1].metrics["dice"] <= 1.0
    assert len(steps) == (4 if method == "pixeldrl" else 2)


def test_bundled_white_matter_model_loads_with_a_complete_card():
    """The shipped ``pixeldrl_wm`` model: loads by name (sha256 checked), card complete, runs on a volume."""
    from steprl.geometry import Geometry, Image
    from steprl.segmentation.inference import segment
    from steprl.segmentation.model import load_segmenter

    model = load_segmenter("pixeldrl_wm")
    card = model.card
    assert model.is_rl and model.size == (128, 128) and card["parameters"] < 25e6 / 4  # < 25 MB in fp32
    for key in ("task", "modality", "grid", "training_data", "training_command", "training_time",
                "validation", "intended_use", "limitations"):
        assert card.get(key), key
    assert card["seed"] == 0 == card["training"]["seed"]
    assert "Apache-2.0" in card["training_data"]["licence"] and "--seed 0" in card["training_command"]
    assert "brats" not in json.dumps(card["training_data"]).lower()
    segment_entry = card["segment"]
    assert segment_entry["name"] == "Cerebral white matter" and "68523003" in segment_entry["terminology"]
    assert len(segment_entry["color"]) == 3 and all(0 <= c <= 1 for c in segment_entry["color"])
    assert next(model.net.parameters()).dtype == torch.float32
    rng = np.random.default_rng(0)
    geometry = Geometry((4, 40, 36), (1.2, 1.0, 3.0), (0, 0, 0), np.eye(3))
    volume = Image(rng.random((4, 40, 36)).astype(np.float32), geometry)
    steps = list(segment(volume, model, steps=2, device="cpu"))
    assert [s.metrics["stage"] for s in steps] == ["start", "policy", "policy", "border"]  # the card asks for it
    assert steps[-1].step == 3 and steps[-1].mask.array.shape == (4, 40, 36)


def test_match_levels_brings_every_t1_volume_to_the_ratio(synthseg):
    """--synth-match-levels: each T1-like training volume is remapped to the grey / white ratio that
    segment() then remaps users' scans to (read the same way, around and inside the white matter)."""
    from steprl.errors import InputError
    from steprl.segmentation.tissue_levels import tissue_levels
    from steprl.synth.segmentation_slices import SynthSegSliceSource

    source = SynthSegSliceSource(synthseg, (64, 64), seed=0, val_slices=2, max_train_subjects=1, validation=1,
                                 match_levels=0.6)
    assert source.description["match_levels"] == 0.6
    ratios = []
    for seed in range(3):
        image, white = source.synth_volume(source.train_labels[0], np.random.default_rng(seed), t1=True)
        grey_level, white_level = tissue_levels(image, white, slice_axis=0)
        ratios.append(grey_level / white_level)
    assert np.allclose(ratios, 0.6, atol=0.01), ratios
    with pytest.raises(InputError, match="match-levels"):
        SynthSegSliceSource(synthseg, (32, 32), max_train_subjects=1, validation=1, match_levels=1.2)


def test_wild_head_option_reaches_the_source_and_its_card(synthseg, tmp_path):
    """--synth-wild-head goes from the command line to the slice source, is recorded in the training
    data's description (so the card says how the model was trained), and a share outside [0, 1] is refused."""
    from steprl.cli import build_parser
    from steprl.errors import InputError
    from steprl.segmentation.training import build_source
    from steprl.synth.segmentation_slices import SynthSegSliceSource

    command = ["train", "segmentation", "--synthseg", str(synthseg), "--out", str(tmp_path / "r"), "--size", "32", "32",
               "--synth-subjects", "1", "--val-slices", "2", "--synth-wild-head", "0.5"]
    args = build_parser().parse_args(command)
    source = build_source(args)
    assert source.wild_head == 0.5 and source.description["wild_head"] == 0.5
    plain = SynthSegSliceSource(synthseg, (32, 32), max_train_subjects=1, validation=1, val_slices=2)
    assert "wild_head" not in plain.description  # runs started before the option still resume
    with pytest.raises(InputError, match="wild-head"):
        SynthSegSliceSource(synthseg, (32, 32), max_train_subjects=1, validation=1, wild_head=1.5)


def test_strip_options_reach_the_source_and_draw_rims_of_random_width(synthseg, tmp_path, monkeypatch):
    """--synth-strip and --synth-strip-margin reach the slice source and its description (recorded in the
    card; the margin only when used, so earlier runs still resume); stripped volumes keep a rim of random
    width around the brain, wider than brain-only stripping leaves; out-of-range values are refused."""
    from steprl.cli import build_parser
    from steprl.errors import InputError
    from steprl.segmentation.training import build_source
    from steprl.synth import segmentation_slices
    from steprl.synth.segmentation_slices import SynthSegSliceSource

    command = ["train", "segmentation", "--synthseg", str(synthseg), "--out", str(tmp_path / "r"), "--size", "32", "32",
               "--synth-subjects", "1", "--val-slices", "2", "--synth-strip", "1", "--synth-strip-margin", "20"]
    source = build_source(build_parser().parse_args(command))
    assert source.strip_probability == 1.0 and source.description["strip_margin_mm"] == 20.0
    brain_only = SynthSegSliceSource(synthseg, (32, 32), max_train_subjects=1, validation=1, val_slices=2,
                                     strip_probability=1.0)
    assert "strip_margin_mm" not in brain_only.description
    kept, original = [], segmentation_slices.skull_strip

    def spy(labels, margin_mm=0.0, spacing_mm=1.0):
        stripped = original(labels, margin_mm, spacing_mm)
        kept.append((margin_mm, int((stripped > 0).sum()), int((original(labels) > 0).sum())))
        return stripped

    monkeypatch.setattr(segmentation_slices, "skull_strip", spy)
    for k in range(4):
        source.synth_volume(source.train_labels[0], np.random.default_rng(k), spacing=7.0)
    margins = [m for m, _, _ in kept]
    assert len(kept) == 4 and all(0 <= m <= 20 for m in margins) and max(margins) - min(margins) > 2
    assert all(rim >= alone for _, rim, alone in kept) and any(rim > alone * 1.1 for _, rim, alone in kept), kept
    for bad in ({"strip_margin_mm": -1.0}, {"strip_margin_mm": 100.0}, {"strip_probability": 1.5}):
        with pytest.raises(InputError, match="synth-strip"):
            SynthSegSliceSource(synthseg, (32, 32), max_train_subjects=1, validation=1, val_slices=2, **bad)
