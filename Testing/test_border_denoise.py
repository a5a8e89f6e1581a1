"""Noise-adaptive smoothing before the native border's rule (steprl.segmentation.denoise)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from steprl.metrics import dice
from steprl.segmentation import denoise
from steprl.segmentation.border import native_border
from test_native_border import ball, partial_volume_image


def test_noise_level_reads_the_noise_not_a_smooth_ramp():
    rng = np.random.default_rng(0)
    shape = (40, 48, 44)
    ramp = np.linspace(0.6, 1.0, shape[2], dtype=np.float32)[None, None, :]  # a bias-like slope
    image = ramp + rng.normal(0, 0.03, shape).astype(np.float32)
    core = np.zeros(shape, bool)
    core[5:-5, 5:-5, 5:-5] = True
    assert denoise.noise_level(image, core) == pytest.approx(0.03, rel=0.08)
    assert denoise.noise_level(np.broadcast_to(ramp, shape), core) < 0.002
    assert denoise.noise_level(image, np.zeros(shape, bool)) is None  # too few voxels


def test_smoothing_sigma_brings_the_noise_to_the_target():
    assert denoise.smoothing_sigma(0.05) == 0.0  # below the target: untouched
    assert denoise.smoothing_sigma(0.3, target=0) == 0.0  # 0: off
    sigma = denoise.smoothing_sigma(0.24, ndim=3, target=0.08)
    assert 0.24 * denoise.noise_gain(sigma, 3) == pytest.approx(0.08, rel=1e-6)
    assert denoise.smoothing_sigma(0.3, ndim=3, target=0.08) > sigma  # noisier: smoothed more
    assert denoise.smoothing_sigma(0.2, ndim=2) > denoise.smoothing_sigma(0.2, ndim=3)  # fewer neighbours to average
    assert denoise.smoothing_sigma(100.0) == denoise.MAX_SIGMA


@pytest.mark.parametrize("sigma", [0.4, 0.8, 1.5])
def test_smoothing_divides_white_noise_by_its_gain(sigma):
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 1, (48, 48, 48)).astype(np.float32)
    smoothed = denoise.smooth(noise, sigma)
    assert smoothed.shape == noise.shape and smoothed.dtype == np.float32
    gain = float(smoothed[8:-8, 8:-8, 8:-8].std() / noise.std())
    assert gain == pytest.approx(denoise.noise_gain(sigma, 3), rel=0.05)
    # for wide kernels the sampled Gaussian approaches the continuous one's gain, 1 / (2 sqrt(pi) sigma) ** 1.5
    if sigma >= 0.8:
        assert denoise.noise_gain(sigma, 3) == pytest.approx((2 * math.sqrt(math.pi) * sigma) ** -1.5, rel=0.05)
    assert np.array_equal(denoise.smooth(noise, 0.0), noise)
    ramp = np.broadcast_to(np.linspace(0, 1, 48, dtype=np.float32), (48, 48, 48))
    assert np.allclose(denoise.smooth(ramp, sigma)[:, :, 8:-8], ramp[:, :, 8:-8], atol=1e-5)  # a ramp stays put


def test_a_noisy_scan_is_smoothed_and_its_border_improves():
    rng = np.random.default_rng(2)
    truth = ball((48, 48, 48), 14.0)
    image = partial_volume_image(truth, 0.9, 0.6, rng, noise=0.08)  # noise 0.27 of the gap: one subject's scan
    coarse = ball((48, 48, 48), 15.2)
    plain = native_border(image, coarse, (2, 2, 2), noise_target=0)
    smoothed = native_border(image, coarse, (2, 2, 2))
    assert plain.smoothing == 0 and plain.noise_ratio is None
    assert 0.22 < smoothed.noise_ratio < 0.4  # 0.08 over a gap of 0.3, a little less as the levels read it
    assert smoothed.smoothing == pytest.approx(denoise.smoothing_sigma(smoothed.noise_ratio), rel=1e-6)
    assert smoothed.smoothing > 0.4
    assert dice(smoothed.mask, truth) > dice(plain.mask, truth) + 0.02


def test_a_clean_scan_is_left_as_it_is():
    rng = np.random.default_rng(3)
    truth = ball((40, 40, 40), 12.0)
    image = partial_volume_image(truth, 0.9, 0.5, rng, noise=0.01)
    mask = ball((40, 40, 40), 13.0)
    done = native_border(image, mask, (2, 2, 2))
    assert done.noise_ratio < denoise.NOISE_TARGET and done.smoothing == 0
    assert np.array_equal(done.mask, native_border(image, mask, (2, 2, 2), noise_target=0).mask)


def test_segment_takes_the_noise_target_from_the_card(caplog):
    """The border stage of segment() reads inference.border.noise_target (pixeldrl_wm's card: the
    module's target); 0 there turns the smoothing off. (The policy is not run: a ball is not white
    matter to it, so the stage gets a coarse ball as the policy's mask.)"""
    from steprl.geometry import Geometry, Image
    from steprl.segmentation.data import prepare_case
    from steprl.segmentation.inference import _bordered
    from steprl.segmentation.model import load_segmenter

    rng = np.random.default_rng(4)
    truth = ball((40, 48, 48), 14.0)
    image = Image(partial_volume_image(truth, 0.9, 0.55, rng, noise=0.08),
                  Geometry((40, 48, 48), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3)))
    case = prepare_case(image, None, size=(24, 24))  # 2 mm network pixels: a band of 2 voxels
    coarse = ball((40, 48, 48), 15.5).astype(np.uint8)
    settings = dict(load_segmenter("pixeldrl_wm").card["inference"]["border"])
    assert settings["noise_target"] == denoise.NOISE_TARGET
    with caplog.at_level(logging.INFO, logger="steprl.segmentation.inference"):
        smoothed = _bordered(image, coarse, case, settings)
    assert "smoothed by" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="steprl.segmentation.inference"):
        plain = _bordered(image, coarse, case, {**settings, "noise_target": 0})
    assert "noise" not in caplog.text
    assert dice(smoothed != 0, truth) > dice(plain != 0, truth)
