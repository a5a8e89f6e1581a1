"""Synthesis from label maps, the SynthSeg subject split and alignment, and axis-aligned network grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from steprl import spatial
from steprl.errors import InputError
from steprl.geometry import Geometry
from steprl.synth import synthseg
from steprl.synth.from_labels import IntensityModel, SpatialAugment, draw_contrast, random_resample, synthesize


def _toy_labels(shape=(24, 28, 20)) -> torch.Tensor:
    """Three nested boxes with FreeSurfer-like values 0 / 24 / 2 / 41, ``(1, 1, *shape)``."""
    labels = torch.zeros((1, 1, *shape), dtype=torch.long)
    labels[..., 3:-3, 3:-3, 3:-3] = 24
    labels[..., 6:-6, 6:14, 5:-5] = 2
    labels[..., 6:-6, 14:-6, 5:-5] = 41
    return labels


def test_a_shared_contrast_gives_equal_class_means():
    labels = _toy_labels()
    model = IntensityModel.from_synthseg_folder("/nonexistent", values=np.array([0, 2, 24, 41]))
    rng = np.random.default_rng(5)
    contrast = draw_contrast(model, rng)
    a, b = (synthesize(labels, model, rng, contrast=contrast) for _ in range(2))
    order_a = np.argsort([float(a[labels == v].mean()) for v in (0, 2, 24, 41)])
    order_b = np.argsort([float(b[labels == v].mean()) for v in (0, 2, 24, 41)])
    assert (order_a == order_b).all() and not torch.equal(a, b)  # same contrast, new noise / bias


def test_synthesize_gives_random_contrast_constant_within_classes():
    labels = _toy_labels()
    model = IntensityModel.from_synthseg_folder("/nonexistent", values=np.array([0, 2, 24, 41]))
    a = synthesize(labels, model, np.random.default_rng(0))
    b = synthesize(labels, model, np.random.default_rng(1))
    assert a.shape == labels.shape and a.dtype == torch.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    means = [[float(img[labels == v].mean()) for v in (0, 2, 24, 41)] for img in (a, b)]
    # different draws give different contrasts (class order differs or values differ clearly)
    assert max(abs(x - y) for x, y in zip(*means)) > 0.05
    # inside a class the image is far more uniform than across classes (seed 0: 0.07 vs 0.26)
    inner = float(a[labels == 24].std())
    across = float(np.std(means[0]))
    assert inner < 0.5 * across


def test_random_resample_identity_and_augmented():
    labels = _toy_labels((20, 20, 20))
    same = random_resample(labels, 2.0, (20, 20, 20), 2.0, np.random.default_rng(0), aug=None)
    assert torch.equal(same, labels)
    half = random_resample(labels, 2.0, (10, 10, 10), 4.0, np.random.default_rng(0), aug=None)
    assert set(half.unique().tolist()) <= {0, 2, 24, 41} and half.shape == (1, 1, 10, 10, 10)
    moved = random_resample(labels, 2.0, (20, 20, 20), 2.0, np.random.default_rng(3), aug=SpatialAugment())
    changed = float((moved != labels).float().mean())
    assert 0.0 < changed < 0.5  # deformed, but still the same anatomy


def test_centroid_affine_recovers_a_known_affine():
    rng = np.random.default_rng(0)
    ref = {v: rng.uniform(-60, 60, size=3) for v in list(synthseg.BRAIN_STRUCTURES)[:10]}
    truth = np.eye(4)
    truth[:3, :3] = np.array([[1.05, 0.02, 0], [-0.03, 0.97, 0.01], [0, 0.02, 1.1]])
    truth[:3, 3] = [3.0, -4.0, 7.5]
    subject = {v: truth[:3, :3] @ p + truth[:3, 3] for v, p in ref.items()}
    assert np.allclose(synthseg.centroid_affine(ref, subject), truth, atol=1e-8)
    with pytest.raises(InputError, match="in common"):
        synthseg.centroid_affine(ref, {2: np.zeros(3)})


def test_split_subjects_is_disjoint_and_checks_counts(tmp_path):
    paths = [tmp_path / f"training_seg_{k:02d}.nii.gz" for k in range(1, 11)]
    split = synthseg.split_subjects(paths, validation=2, test=3)
    assert len(split.train) == 5 and len(split.validation) == 2 and split.test == paths[-3:]
    assert not set(split.train) & set(split.validation)
    with pytest.raises(InputError, match="training subjects"):
        synthseg.split_subjects(paths[:4], validation=2, test=2)
    with pytest.raises(InputError, match="SynthSeg label maps"):
        synthseg.list_label_maps(tmp_path)


def test_structure_lookup_covers_the_32_structures():
    index = synthseg.structure_index()
    assert sorted(index.values()) == list(range(1, 33))
    table = synthseg.lookup_table(index)
    assert table[0] == 0 and table[530] == 0 and table[2] == 1  # extra-cerebral -> background


def test_axis_aligned_grid_covers_an_oblique_image():
    c, s = np.cos(0.4), np.sin(0.4)
    direction = np.array([[0, 0, 1], [c, -s, 0], [s, c, 0]])  # permuted and rotated axes
    geom = Geometry((30, 40, 50), (1.0, 1.5, 2.0), (10.0, -20.0, 5.0), tuple(direction.ravel()))
    grid = geom.axis_aligned((16, 16, 16))
    assert np.allclose(np.asarray(grid.direction).reshape(3, 3), np.eye(3))
    # every voxel centre of the image lies inside the axis-aligned box
    a, b = geom.index_to_physical()
    corners = np.array(np.meshgrid([0, 49], [0, 39], [0, 29], indexing="ij")).reshape(3, -1)
    points = a @ corners + b[:, None]
    low = np.asarray(grid.origin)
    high = low + np.asarray(grid.spacing) * 15
    assert np.all(points >= low[:, None] - 1e-6) and np.all(points <= high[:, None] + 1e-6)
    assert np.isclose(points.min(axis=1), low).all() and np.isclose(points.max(axis=1), high).all()
    # resampling through it is physical: a constant image stays constant
    out = spatial.resample(torch.ones(1, 1, 30, 40, 50), geom, grid)
    assert torch.allclose(out, torch.ones_like(out))


def test_synthseg_training_smoke_gives_an_lps_model_that_registers_oblique_input(shared_data, tmp_path):
    """The 3D starter model's training command, a few iterations on a tiny grid (CI smoke test)."""
    import json

    from steprl.cli import main
    from steprl.geometry import Image
    from steprl.registration.inference import register

    folder = shared_data / "synthseg"
    if not folder.is_dir():
        pytest.skip(f"SynthSeg label maps not found at {folder}")
    out = tmp_path / "run"
    code = main(["train", "registration", "--synthseg", str(folder), "--out", str(out), "--grid", "16", "16", "16",
                 "--synth-spacing", "13", "--epochs", "1", "--iterations", "2", "--batch", "1",
                 "--episode-steps", "2", "--known-pairs", "0.5", "--field-level", "2", "--sac-start", "1",
                 "--grad-clip", "10", "--no-tensorboard", "--quiet"])
    assert code in (None, 0)
    card = json.loads((out / "model_best.json").read_text())
    assert card["inference"]["orientation"] == "lps"
    assert card["training"]["dice_weight"] == 1.0 and card["training"]["ncc_weight"] == 1.0
    assert card["training"]["field_weight"] == 1.0 and card["training"]["data"]["known_field_pairs"] == 0.5
    assert card["config"]["field_level"] == 2 and card["training"]["sac_start"] == 1
    held_out = set(card["training"]["data"]["held_out_subjects"])
    assert len(held_out) == 3 and not held_out & set(card["training"]["data"]["train_subjects"])
    rng = np.random.default_rng(0)
    c, s = np.cos(0.3), np.sin(0.3)
    geom = Geometry((20, 24, 22), (2.0, 2.5, 3.0), (5.0, 0.0, -3.0), (c, -s, 0, s, c, 0, 0, 0, 1))
    fixed, moving = (Image(rng.random((20, 24, 22)).astype(np.float32), geom) for _ in range(2))
    results = list(register(fixed, moving, out / "model_best.safetensors", steps=2, device="cpu"))
    assert len(results) == 3 and results[-1].warped.geometry.matches(geom)
    field_grid = results[-1].displacement.geometry  # the network grid: axis-aligned LPS over the fixed image
    assert field_grid.shape == (16, 16, 16) and np.allclose(np.asarray(field_grid.direction).ravel(), np.eye(3).ravel())


@pytest.mark.parametrize("supersample", [1, 2])
def test_synthseg_known_pairs_carry_the_field_that_registers_them(shared_data, supersample):
    """Known pairs from real SynthSeg subjects: the field raises their Dice; mixed batches flag which items have one."""
    from steprl.losses import one_hot, soft_dice
    from steprl.synth.from_labels import scaled_augment
    from steprl.synth.registration_pairs import PAIR_AUGMENT, SynthSegPairSource

    folder = shared_data / "synthseg"
    if not folder.is_dir():
        pytest.skip(f"SynthSeg label maps not found at {folder}")
    paths = synthseg.list_label_maps(folder)
    # fields 3x the default: at 6.6 mm the default residual (~1 voxel) is as large as the error of
    # sampling labels with nearest neighbour twice, and Dice could not tell the field from none
    source = SynthSegPairSource(paths[:2], paths[2:4], (32, 32, 32), spacing=6.6, val_pairs=2, known_fraction=1.0,
                                pair_augment=scaled_augment(PAIR_AUGMENT, 3.0), supersample=supersample)
    assert source.validation().fixed.shape == (2, 1, 32, 32, 32)
    assert source.validation().true_field is None  # validation pairs are always two subjects
    batch = source.sample(2, np.random.default_rng(0))
    assert batch.field_known.tolist() == [True, True]
    def dice(k: int, field: torch.Tensor) -> float:
        warped = spatial.warp(batch.moving_labels[k:k + 1].float(), field, "nearest").round().long()
        return soft_dice(one_hot(batch.fixed_labels[k:k + 1], 32), one_hot(warped, 32)).item()

    for k in range(2):
        field = batch.true_field[k:k + 1]
        assert dice(k, field) > dice(k, torch.zeros_like(field)) + 0.05 > dice(k, -field) + 0.05
    source.known_fraction = 0.5
    mixed = source.sample(16, np.random.default_rng(1))
    assert 0 < int(mixed.field_known.sum()) < 16
    assert mixed.true_field[~mixed.field_known].abs().max() == 0  # no field where none is known


def test_bright_fat_puts_some_extracerebral_tissue_above_white_matter_and_is_off_by_default(shared_data):
    """Issue 12: real T1 fat is brighter than white matter; with bright_fat 1 every T1-like draw has
    1-3 extra-cerebral classes at 1.1-1.8x white matter, at 0 the draws (and the seeds) are unchanged."""
    from steprl.synth.from_labels import EXTRACEREBRAL_FROM

    model = IntensityModel.from_synthseg_folder(shared_data / "synthseg")
    values = np.flatnonzero(model.classes)
    extra = np.unique(model.classes[values[values >= EXTRACEREBRAL_FROM]])
    wm = model.classes[2]
    ratios_on, ratios_off = [], []
    for seed in range(40):
        means_on, _ = draw_contrast(model, np.random.default_rng(seed), t1_probability=1.0, bright_fat=1.0)
        means_off, _ = draw_contrast(model, np.random.default_rng(seed), t1_probability=1.0)
        plain, _ = draw_contrast(model, np.random.default_rng(seed), t1_probability=1.0, bright_fat=0.0)
        np.testing.assert_array_equal(means_off, plain)
        ratios_on.append(means_on[extra].max() / means_on[wm])
        ratios_off.append(means_off[extra].max() / means_off[wm])
        brain = np.setdiff1d(np.arange(model.n_classes), extra)
        np.testing.assert_array_equal(means_on[brain], means_off[brain])  # only extra-cerebral classes change
    assert min(ratios_on) >= 1.1 - 1e-9 and max(ratios_on) <= 1.8 + 1e-9
    assert np.median(ratios_off) < 1.1  # SynthSeg's T1 priors alone rarely do it


def test_wild_head_draws_the_extracerebral_levels_apart_from_the_brain_and_is_off_by_default(shared_data):
    """Issue 12: with wild_head 1 every T1-like draw gives the extra-cerebral classes levels spread over
    0-1.8x white matter, unrelated to the priors, and leaves the brain's classes as they were; at 0 the
    draws (and the seeds) are unchanged."""
    from steprl.synth.from_labels import EXTRACEREBRAL_FROM, HEAD_RANGE

    model = IntensityModel.from_synthseg_folder(shared_data / "synthseg")
    values = np.flatnonzero(model.classes)
    extra = np.unique(model.classes[values[values >= EXTRACEREBRAL_FROM]])
    brain = np.setdiff1d(np.arange(model.n_classes), extra)
    wm = model.classes[2]
    ratios_on, ratios_off = [], []
    for seed in range(40):
        on, _ = draw_contrast(model, np.random.default_rng(seed), t1_probability=1.0, wild_head=1.0)
        off, _ = draw_contrast(model, np.random.default_rng(seed), t1_probability=1.0)
        np.testing.assert_array_equal(off, draw_contrast(model, np.random.default_rng(seed), t1_probability=1.0,
                                                         wild_head=0.0)[0])
        np.testing.assert_array_equal(on[brain], off[brain])
        ratios_on.append(on[extra] / on[wm])
        ratios_off.append(off[extra] / off[wm])
    ratios_on, ratios_off = np.concatenate(ratios_on), np.concatenate(ratios_off)
    assert ratios_on.min() >= HEAD_RANGE[0] and ratios_on.max() <= HEAD_RANGE[1] + 1e-9
    assert (ratios_on > 1.2).mean() > 0.25 > (ratios_off > 1.2).mean()  # bright heads common only when wild
    assert ratios_on.std() > 1.5 * ratios_off.std()


def test_soft_grey_brings_grey_matter_toward_white_matter_and_is_off_by_default(shared_data):
    """Issue 12: real T1 grey matter sits at ~0.78 of white matter, SynthSeg's T1 priors at ~0.6. With
    soft_grey 1 every T1-like draw squeezes the grey classes toward white matter (CSF, white matter and
    the classes brighter than it unchanged); at 0 the draws and the seeds are unchanged."""
    from steprl.synth.from_labels import GREY_FROM

    model = IntensityModel.from_synthseg_folder(shared_data / "synthseg")
    wm, cortex, csf = model.classes[2], model.classes[3], model.classes[24]
    assert model.t1_means[0, model.contrast_class[24]] < GREY_FROM * model.t1_means[0, model.contrast_class[2]]
    on_ratios, off_ratios, csf_kept = [], [], 0
    for seed in range(40):
        on, _ = draw_contrast(model, np.random.default_rng(seed), t1_probability=1.0, soft_grey=1.0)
        off, _ = draw_contrast(model, np.random.default_rng(seed), t1_probability=1.0)
        np.testing.assert_array_equal(off, draw_contrast(model, np.random.default_rng(seed), t1_probability=1.0,
                                                         soft_grey=0.0)[0])
        assert on[wm] == off[wm]
        untouched = (off >= off[wm]) | (off < GREY_FROM * off[wm])
        np.testing.assert_array_equal(on[untouched], off[untouched])
        csf_kept += int(on[csf] == off[csf])
        assert np.all(on[~untouched] >= off[~untouched]) and np.all(on[~untouched] < on[wm])
        on_ratios.append(on[cortex] / on[wm])
        off_ratios.append(off[cortex] / off[wm])
    assert np.median(off_ratios) < 0.65 < 0.7 < np.median(on_ratios)
    assert csf_kept >= 36  # CSF stays dark in (nearly) every draw
