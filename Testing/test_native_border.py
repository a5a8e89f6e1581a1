"""The native-resolution border (steprl.segmentation.border) and how segment / the CLI run it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from steprl.metrics import dice
from steprl.segmentation.border import band_voxels, border_band, grown_box, native_border


def ball(shape, radius, centre=None) -> np.ndarray:
    """bool ball of ``radius`` voxels (sub-voxel: a voxel centre inside it)."""
    centre = np.array(centre if centre is not None else [(n - 1) / 2 for n in shape])
    grids = np.indices(shape).astype(np.float64)
    return np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre))) <= radius


def partial_volume_image(truth: np.ndarray, inside: float, around: float, rng, noise: float = 0.02) -> np.ndarray:
    """The object at ``inside``, the rest at ``around``, with a one-voxel partial-volume rim and noise."""
    soft = truth.astype(np.float32)
    for axis in range(truth.ndim):  # a [1, 2, 1] / 4 blur per axis: the rim mixes both levels
        soft = 0.25 * np.roll(soft, 1, axis) + 0.5 * soft + 0.25 * np.roll(soft, -1, axis)
    image = around + (inside - around) * soft
    return (image + rng.normal(0, noise, truth.shape)).astype(np.float32)


@pytest.mark.parametrize(("inside", "around"), [(0.9, 0.5), (0.2, 0.7)])  # bright (T1 white matter), dark
def test_a_coarse_mask_gets_the_true_border_back(inside, around):
    rng = np.random.default_rng(0)
    truth = ball((40, 40, 40), 12.0)
    image = partial_volume_image(truth, inside, around, rng)
    over = ball((40, 40, 40), 13.5)  # more than a voxel over, as a coarse grid's border can be
    done = native_border(image, over, (2, 2, 2))
    assert done.applied and done.reason == ""
    assert dice(over, truth) < 0.91 and dice(done.mask, truth) > 0.97
    assert done.threshold == pytest.approx(around + 0.5 * (inside - around), abs=0.05)
    # A voxel short: the ring the surroundings' level is read in holds object voxels, the midpoint moves
    # toward the object's level and the border moves less than it should (the module docstring says so).
    short = ball((40, 40, 40), 11.0)
    done = native_border(image, short, (2, 2, 2))
    assert dice(done.mask, truth) > dice(short, truth) + 0.02


def test_only_the_band_is_redecided():
    """A bright blob far from the policy's border stays out, a dark hole deep inside stays in."""
    rng = np.random.default_rng(1)
    truth = ball((48, 48, 48), 14.0)
    image = partial_volume_image(truth, 0.9, 0.5, rng)
    image[2:6, 2:6, 2:6] = 0.95  # bright, far outside
    hole = ball((48, 48, 48), 2.0)
    image[hole] = 0.4  # dark, at the centre of the object
    done = native_border(image, truth, (2, 2, 2))
    assert not done.mask[2:6, 2:6, 2:6].any()
    assert done.mask[hole].all()
    changed = done.mask != truth
    assert not (changed & ~border_band(truth, (2, 2, 2))).any()


def test_no_contrast_or_no_object_keeps_the_policy_mask():
    rng = np.random.default_rng(2)
    mask = ball((30, 30, 30), 8.0)
    flat = (0.5 + rng.normal(0, 0.01, mask.shape)).astype(np.float32)
    done = native_border(flat, mask, (2, 2, 2))
    assert not done.applied and "not brighter or darker" in done.reason
    assert np.array_equal(done.mask, mask)
    tiny = ball((30, 30, 30), 1.0)
    done = native_border(flat, tiny, (2, 2, 2))
    assert not done.applied and "too small" in done.reason and np.array_equal(done.mask, tiny)


def test_band_is_one_network_pixel_per_axis():
    assert band_voxels(1.8, (1.0, 1.0, 1.0)) == (2, 2, 2)
    assert band_voxels(1.8, (3.0, 0.9, 0.9)) == (1, 2, 2)  # at least one voxel across thick slices
    with pytest.raises(ValueError):
        band_voxels(0.0, (1.0, 1.0))
    point = np.zeros((9, 9), dtype=bool)
    point[4, 4] = True
    grown = grown_box(point, (1, 2))
    assert grown.sum() == 3 * 5 and grown[3:6, 2:7].all()  # a box, not a cross


def test_segment_ends_with_the_border_and_the_cli_can_turn_it_off(tmp_path, capsys):
    """pixeldrl_wm's card asks for the border: one more result, staged "border", that changes the last
    policy mask only near its border; --no-border leaves it out."""
    from steprl.cli import main
    from steprl.geometry import Geometry, Image
    from steprl.io import write_image
    from steprl.segmentation.inference import segment

    rng = np.random.default_rng(3)
    truth = ball((24, 64, 64), 20.0, centre=(12, 31.5, 31.5))
    image = Image(partial_volume_image(truth, 0.9, 0.55, rng), Geometry((24, 64, 64), (1.0, 1.0, 1.0), (0, 0, 0),
                                                                        np.eye(3)))
    history = list(segment(image, "pixeldrl_wm", steps=1, device="cpu"))
    assert [h.metrics["stage"] for h in history] == ["start", "policy", "border"]
    policy, bordered = history[1].mask.array != 0, history[2].mask.array != 0
    changed = policy != bordered
    assert np.array_equal(changed, history[2].changed.array != 0)
    assert not (changed & ~border_band(policy, (2, 2, 2))).any()  # 128 pixels over 64 mm: band of one voxel
    path = tmp_path / "image.nii.gz"
    write_image(image, path)
    for extra, stages in (([], ["start", "policy", "border"]), (["--no-border"], ["start", "policy"])):
        out = tmp_path / ("off" if extra else "on")
        code = main(["segment", str(path), "--steps", "1", "--out", str(out), "--quiet", "--device", "cpu", *extra])
        capsys.readouterr()
        metrics = json.loads((out / "metrics.json").read_text())
        assert code == 0 and [s["stage"] for s in metrics["steps"]] == stages
        assert metrics["border"] == (not extra)
        assert sorted(p.name for p in (out / "steps").iterdir()) == [f"mask_step_{k:03d}.nii.gz"
                                                                     for k in range(1, len(stages))]


def test_voxels_far_brighter_than_the_object_are_dropped_anywhere():
    """Scalp fat the policy took for white matter: much brighter than white matter, so not white matter,
    even away from the border; a dark object's limit is on the dark side."""
    rng = np.random.default_rng(4)
    truth = ball((40, 40, 40), 12.0)
    image = partial_volume_image(truth, 0.8, 0.5, rng)
    fat = ball((40, 40, 40), 2.5, centre=(19.5, 19.5, 30))  # inside the mask, far from its border
    image[fat] = 1.6  # more than 2 gaps above white
    done = native_border(image, truth, (1, 1, 1))
    assert not done.mask[fat].any() and done.mask[truth & ~fat & ~border_band(truth, (1, 1, 1))].all()
    dark = partial_volume_image(truth, 0.4, 0.7, rng)
    dark[fat] = -0.5
    assert not native_border(dark, truth, (1, 1, 1)).mask[fat].any()


def test_detached_pieces_are_dropped_and_main_pieces_kept():
    """A far blob (cerebellar white matter, scalp fat) goes; a piece within reach and a second main piece
    (a hemisphere the policy left unjoined) stay."""
    from steprl.segmentation.border import keep_attached

    shape = (40, 40, 80)
    left, right = ball(shape, 10.0, centre=(20, 20, 18)), ball(shape, 10.0, centre=(20, 20, 52))  # 14 voxels apart
    far = ball(shape, 2.0, centre=(20, 36, 70))  # 6+ voxels from the right ball
    near = ball(shape, 1.0, centre=(20, 20, 31))  # 2 voxels from the left ball
    mask = left | right | far | near
    kept = keep_attached(mask, (4, 4, 4))
    assert np.array_equal(kept, left | right | near)
    assert np.array_equal(keep_attached(left, (4, 4, 4)), left)
    assert not keep_attached(np.zeros(shape, bool), (1, 1, 1)).any()
    rng = np.random.default_rng(5)
    image = partial_volume_image(mask, 0.9, 0.5, rng)
    assert native_border(image, mask, (1, 1, 1), reach=(4, 4, 4)).mask[far].sum() == 0
    assert native_border(image, mask, (1, 1, 1)).mask[far].sum() > 0  # no reach: every piece kept
