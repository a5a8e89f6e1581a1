"""The object's intensity field (steprl.segmentation.intensity_field) and the border that flattens by it:
a bias field is found and removed, a flat object's anatomy is left alone, and the border recovers what a
single midpoint cuts under a bias."""

from __future__ import annotations

import numpy as np
import pytest
from steprl.metrics import dice
from steprl.segmentation import intensity_field
from steprl.segmentation.border import native_border
from steprl.segmentation.intensity_field import MIN_SPAN, fit_field
from test_native_border import ball, partial_volume_image

SHAPE = (40, 48, 44)


def _bias(amplitude: float, shape=SHAPE) -> np.ndarray:
    """A smooth multiplicative field, 1 +- ``amplitude``: a slope along two axes and a curvature."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    first, second, last = grids[0], grids[-2], grids[-1]  # 2D: the first axis is also the second-last
    raw = 0.6 * first + 0.5 * last + 0.4 * second * second - 0.3 * last * first
    return (1.0 + amplitude * raw / np.abs(raw).max()).astype(np.float32)


def test_a_bias_field_is_recovered_inside_the_object():
    rng = np.random.default_rng(0)
    truth = ball(SHAPE, 16.0)
    flat = partial_volume_image(truth, 0.9, 0.55, rng, noise=0.01)
    bias = _bias(0.2)
    core = ball(SHAPE, 14.0)  # the object's sure inside, off its partial-volume rim
    field = fit_field(flat * bias, core)
    assert field is not None and field.order == intensity_field.ORDER
    values = field.values()
    assert values.shape == SHAPE and values.dtype == np.float32
    relative = values[core] / bias[core]  # the fitted field is the bias up to one constant factor
    assert np.std(relative) / np.mean(relative) < 0.01
    expected_span = np.subtract(*np.percentile(bias[core], [95, 5])) / np.median(bias[core])
    assert field.span == pytest.approx(expected_span, rel=0.15) and field.span > MIN_SPAN
    flattened = field.divide(flat * bias)[core]
    assert np.std(flattened) < 0.5 * np.std((flat * bias)[core])


def test_a_flat_object_has_a_field_below_the_span_that_is_acted_on():
    rng = np.random.default_rng(1)
    truth = ball(SHAPE, 16.0)
    field = fit_field(partial_volume_image(truth, 0.9, 0.55, rng), ball(SHAPE, 14.0))
    assert field is not None and field.span < 0.2 * MIN_SPAN
    assert native_border(partial_volume_image(truth, 0.9, 0.55, rng), truth, (2, 2, 2)).field_applied is False


def test_leaving_out_what_lies_below_the_threshold_straightens_a_field_bent_to_a_darker_shell():
    """A mask a voxel and a half over a ball holds a darker shell, which one quadratic fit bends to (a field
    spanning 50 % where there is none); without the voxels below the grey / white midpoint it spans a third
    of that. Not nothing: a ball's partial-volume rim is itself radially symmetric, which a quadratic fits
    (a brain's folded white-matter surface is not)."""
    rng = np.random.default_rng(4)
    truth = ball(SHAPE, 12.0)
    image = partial_volume_image(truth, 0.9, 0.5, rng)
    over = ball(SHAPE, 13.5)
    bent = fit_field(image, over).span
    straighter = fit_field(image, over, threshold=0.7).span
    assert bent > 5 * MIN_SPAN and straighter < 0.4 * bent


def test_too_small_a_mask_gives_no_field():
    image = np.full((12, 12, 12), 0.8, dtype=np.float32)
    assert fit_field(image, ball((12, 12, 12), 2.0)) is None
    assert fit_field(image, np.zeros((12, 12, 12), dtype=bool)) is None


def test_two_dimensional_images_fit_too():
    truth = ball((64, 64), 24.0)
    image = partial_volume_image(truth, 0.9, 0.5, np.random.default_rng(2), noise=0.005) * _bias(0.25, (64, 64))
    field = fit_field(image, ball((64, 64), 22.0), order=1)
    assert field is not None and len(field.coefficients) == 3 and field.span > MIN_SPAN


def _borders_of_a_biased_ball(white: float, grey: float, noise: float, amplitude: float, seed: int):
    """A ball of radius 15 (``white``) in ``grey`` times a +-``amplitude`` bias, and the border of a mask 1.5
    voxels too large without and with the field: ``(truth, plain, flattened)``."""
    truth = ball(SHAPE, 15.0)
    image = partial_volume_image(truth, white, grey, np.random.default_rng(seed), noise=noise) * _bias(amplitude)
    over = ball(SHAPE, 16.5)
    return truth, native_border(image, over, (2, 2, 2), field_order=0), native_border(image, over, (2, 2, 2))


def test_under_a_bias_the_border_flattens_and_keeps_what_one_midpoint_cuts():
    """White matter 25 % darker on one side than the other: one midpoint cuts its dark side and takes grey on
    its bright side; flattened by its own field first, the border finds the true ball again."""
    truth, plain, flattened = _borders_of_a_biased_ball(0.85, 0.65, 0.01, 0.25, seed=3)
    assert flattened.field_applied and flattened.field_span > MIN_SPAN and plain.field_span is None
    assert dice(flattened.mask, truth) > 0.97
    assert dice(flattened.mask, truth) > dice(plain.mask, truth) + 0.03


def test_on_a_flat_contrast_scan_a_field_of_seven_per_cent_is_flattened():
    """Grey at 0.9 of white (10 % apart, as in MNI152 made to look like a flat one-subject scan): a bias whose
    fitted field spans 7-8 % of white matter's level moves the level by most of the gap, so one midpoint
    cuts the dark side; the border acts on it (MIN_SPAN was 0.08: this case was left uncorrected)."""
    truth, plain, flattened = _borders_of_a_biased_ball(0.9, 0.81, 0.005, 0.13, seed=5)
    assert MIN_SPAN < flattened.field_span < 0.08 and flattened.field_applied
    assert dice(flattened.mask, truth) > 0.99 and dice(plain.mask, truth) < 0.93


def test_a_field_the_surroundings_do_not_share_is_not_divided_out(monkeypatch):
    """White matter's own level rising 25 % from one side to the other over a flat grey: that is no coil's bias
    (a bias multiplies every tissue), and dividing the whole image by it lifts the grey on the dark side over
    the midpoint. The grey ring's field is flat, so the border leaves the image as it is (the synthetic head
    ``s20-t1-d4``: white field 41 %, grey 11 %, Dice 0.584 flattened, 0.828 not). The biased ball above, whose
    grey shares the field, is still flattened."""
    import steprl.segmentation.border as border

    truth = ball(SHAPE, 15.0)
    white = 0.85 * (1 + 0.25 * np.linspace(-1, 1, SHAPE[0]))[:, None, None]
    image = partial_volume_image(truth, 1.0, 0.0, np.random.default_rng(6), noise=0.0)  # the object's share
    image = (0.6 + (white - 0.6) * image + np.random.default_rng(7).normal(0, 0.01, SHAPE)).astype(np.float32)
    over = ball(SHAPE, 16.5)
    guarded = native_border(image, over, (2, 2, 2))
    assert guarded.field_span > 3 * MIN_SPAN and not guarded.field_applied
    assert guarded.surround_span is not None and guarded.surround_span < border.SHARED_SPAN * guarded.field_span
    _, _, biased = _borders_of_a_biased_ball(0.85, 0.65, 0.01, 0.25, seed=3)
    assert biased.field_applied and biased.surround_span >= border.SHARED_SPAN * biased.field_span
    monkeypatch.setattr(border, "SHARED_SPAN", 0.0)
    unguarded = native_border(image, over, (2, 2, 2))
    assert unguarded.field_applied
    assert dice(guarded.mask, truth) > 0.95 and dice(guarded.mask, truth) > dice(unguarded.mask, truth) + 0.05
