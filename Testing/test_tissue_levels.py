"""Grey / white level matching before segmentation (steprl.segmentation.tissue_levels, issue 12):
the estimator reads the levels around and inside a mask, the remapping puts grey at the card's
ratio of white, and segment()'s first pass applies it only when the card asks for it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from steprl.geometry import Geometry, Image
from steprl.preprocess import normalise_percentile
from steprl.segmentation.inference import _levels_matched
from steprl.segmentation.model import LoadedSegmenter
from steprl.segmentation.tissue_levels import match_levels, plausible, tissue_levels


def _phantom(grey: float = 0.78, white: float = 1.0, shape=(12, 48, 48)) -> tuple[np.ndarray, np.ndarray]:
    """A 'brain': a grey ball around a white core, dark background; returns (image, white mask)."""
    z, y, x = np.indices(shape)
    r = np.sqrt(((z - shape[0] / 2) * 3.0) ** 2 + (y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2)
    image = np.where(r < 20, grey, 0.05).astype(np.float32)
    core = r < 11
    image[core] = white
    rng = np.random.default_rng(0)
    return image + rng.normal(0, 0.01, shape).astype(np.float32), core


def test_levels_are_read_inside_and_around_the_mask():
    image, core = _phantom()
    grey, white = tissue_levels(image, core)
    assert abs(grey - 0.78) < 0.02 and abs(white - 1.0) < 0.02
    assert tissue_levels(image, np.zeros_like(core)) is None
    assert plausible((grey, white)) and not plausible((0.1, 1.0)) and not plausible(None)


def test_remapping_puts_grey_at_the_ratio_and_keeps_white():
    values = np.array([0.0, 0.3, 0.6, 0.8, 0.9, 1.0], dtype=np.float32)
    out = match_levels(values, grey=0.6, white=0.8, grey_to_white=0.5)
    np.testing.assert_allclose(out[[0, 2, 3, 4, 5]], [0.0, 0.4, 0.8, 0.9, 1.0], atol=1e-6)
    assert np.all(np.diff(out) > 0), "the remapping must keep the intensity order"


@pytest.mark.parametrize(("grey", "white", "ratio"), [(0.45, 0.6, 0.8), (0.6, 0.8, 0.5), (0.7, 0.9, 0.95)])
def test_remapping_is_the_piecewise_linear_interpolation(grey, white, ratio):
    """The float32 remapping is np.interp through the knots (0, 0), (grey, ratio * white), (white, white),
    (1, 1), to float32 rounding, at the knots and between them."""
    values = np.concatenate([np.random.default_rng(1).random(5000), [0.0, grey, white, 1.0]]).astype(np.float32)
    expected = np.interp(values, [0.0, grey, white, 1.0], [0.0, ratio * white, white, 1.0])
    out = match_levels(values, grey, white, ratio)
    assert out.dtype == np.float32 and out.shape == values.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-7)


class _ThresholdRunner:
    """Stands in for a trained white-matter model's first pass: white = network input > 0.9."""

    calls = 0

    def run_slices(self, case, active, steps, batch_slices, progress):
        self.calls += 1
        assert steps == 1
        return (case.images > 0.9).to(torch.uint8)[None]


def _loaded(ratio: float | None) -> LoadedSegmenter:
    card = {"method": "pixeldrl-mg", "inference": {"size": [32, 32]}, "normalisation": {"kind": "percentile"}}
    if ratio is not None:
        card["normalisation"]["tissue_levels"] = {"grey_to_white": ratio}
    return LoadedSegmenter(net=None, card=card, path=Path("phantom"))


def test_segment_first_pass_matches_the_card_ratio():
    image, core = _phantom(grey=0.8)
    geometry = Geometry(image.shape, (3.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    runner = _ThresholdRunner()
    matched, normalised = _levels_matched(Image(image, geometry), _loaded(0.55), runner, "axial", 8, True)
    assert runner.calls == 1 and matched.geometry == geometry
    np.testing.assert_array_equal(normalised, normalise_percentile(image))  # handed on to the border
    grey, white = tissue_levels(matched.array, core)
    assert abs(grey / white - 0.55) < 0.03, (grey, white)
    before = tissue_levels(normalise_percentile(image), core)
    assert abs(before[0] / before[1] - 0.8) < 0.03

    untouched = Image(image, geometry)
    assert _levels_matched(untouched, _loaded(None), runner, "axial", 8, True) == (untouched, None)
    assert runner.calls == 1, "no first pass without the card's tissue_levels"


def test_implausible_levels_leave_the_image_and_warn(caplog):
    image, _ = _phantom(grey=0.15)  # grey / white 0.15: not a T1 grey / white pair
    geometry = Geometry(image.shape, (3.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    original = Image(image, geometry)
    with caplog.at_level(logging.WARNING):
        assert _levels_matched(original, _loaded(0.55), _ThresholdRunner(), "axial", 8, True)[0] is original
    assert "T1-weighted" in caplog.text


@pytest.mark.parametrize("bad", [0.0, 0.29, 0.96])
def test_plausible_range(bad):
    assert not plausible((bad, 1.0))


def test_ring_stays_within_the_slices_of_the_mask():
    """With ``slice_axis`` the grey ring grows in-plane only: a mask on some slices reads grey on those
    slices, not from the (different) slices above and below."""
    image, core = _phantom()
    some_slices = np.zeros_like(core)
    some_slices[4:9] = core[4:9]
    image[2:4] = image[9:11] = 0.2  # neighbours that a through-plane ring would pick up
    grey, _ = tissue_levels(image, some_slices, slice_axis=0)
    assert abs(grey - 0.78) < 0.02
    assert tissue_levels(image, some_slices)[0] < 0.7


def test_ring_growth_is_the_neighbour_cross_without_scipy():
    """The ring grows by the 6-neighbour cross per iteration (numpy only: Slicer has no scipy): one voxel
    grown twice covers the 25-voxel octahedron in 3D, 13 voxels within its slice."""
    from steprl.segmentation.tissue_levels import grown

    point = np.zeros((7, 7, 7), dtype=bool)
    point[3, 3, 3] = True
    assert grown(point, 2, [0, 1, 2]).sum() == 25
    assert grown(point, 2, [1, 2]).sum() == 13 and grown(point, 2, [1, 2])[[2, 4]].sum() == 0
