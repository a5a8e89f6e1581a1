"""The policy on every n-th slice (steprl.segmentation.inference.auto_slice_stride): as many slices as fit
in a network pixel are skipped and interpolated, which halves the network's time on a 1 mm head scan with
2 mm network pixels and leaves the mask all but unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from steprl.errors import InputError
from steprl.geometry import Geometry, Image
from steprl.metrics import dice
from steprl.segmentation.data import prepare_case
from steprl.segmentation.inference import _computed_slices, _policy_masks, auto_slice_stride, segment


class _ThresholdRunner:
    """Stands in for a trained policy: object = network input > 0.5 at every step; counts the slices run."""

    def __init__(self) -> None:
        self.slices = 0

    def run_slices(self, case, active, steps, batch_slices, progress):
        self.slices += len(active)
        out = torch.zeros((steps, case.images.shape[0], 1, *case.images.shape[-2:]), dtype=torch.uint8)
        index = torch.from_numpy(np.asarray(active))
        out[:, index] = (case.images[index] > 0.5).to(torch.uint8)[None]
        return out


def _ball_volume(shape=(40, 64, 64), spacing=(2.0, 2.0, 1.0)) -> Image:
    """A bright ball (radius 14 mm) in a dark volume; ``spacing`` in ITK order (x, y, z): 1 mm slices."""
    z, y, x = np.indices(shape).astype(np.float64)
    centre = [(n - 1) / 2 for n in shape]
    r = np.sqrt(((z - centre[0]) * spacing[2]) ** 2 + ((y - centre[1]) * spacing[1]) ** 2
                + ((x - centre[2]) * spacing[0]) ** 2)
    array = np.where(r < 14.0, 0.9, 0.1).astype(np.float32)
    return Image(array, Geometry(shape, spacing, (0.0, 0.0, 0.0), np.eye(3)))


def test_the_stride_is_the_slices_in_a_network_pixel():
    image = _ball_volume()
    case = prepare_case(image, size=(32, 32))  # 64 x 2 mm in 32 pixels: ~4 mm network pixels
    pixel = max(case.grid.network_spacing)
    assert auto_slice_stride(case, 1.0) == int(np.floor(pixel)) >= 2
    assert auto_slice_stride(case, pixel) == 1 and auto_slice_stride(case, 3 * pixel) == 1
    assert auto_slice_stride(case, 0.0) == 1


def test_computed_slices_always_end_with_the_last():
    assert _computed_slices(np.arange(10), 3).tolist() == [0, 3, 6, 9]
    assert _computed_slices(np.arange(11), 3).tolist() == [0, 3, 6, 9, 10]
    assert _computed_slices(np.array([2, 3, 5, 8]), 1).tolist() == [2, 3, 5, 8]
    assert _computed_slices(np.array([], dtype=int), 2).tolist() == []


def test_interpolated_slices_agree_with_running_every_slice():
    image = _ball_volume()
    case = prepare_case(image, size=(32, 32))
    every, strided = _ThresholdRunner(), _ThresholdRunner()
    full = list(_policy_masks(every, case, 3, 2, 8, True, None, 1))
    skipped = list(_policy_masks(strided, case, 3, 2, 8, True, None, 3))
    active = np.flatnonzero(~case.constant)  # the slices through the ball
    computed = _computed_slices(active, 3)
    assert every.slices == len(active) > 20 and strided.slices == len(computed) <= len(active) // 3 + 2
    assert len(full) == len(skipped) == 2 and full[0].shape == image.array.shape
    assert dice(skipped[-1], full[-1]) > 0.95  # a 28-slice ball: its caps are where interpolation errs
    assert np.array_equal(skipped[-1][computed], full[-1][computed])  # the computed slices are the policy's own
    assert not skipped[-1][case.constant].any()


def test_segment_refuses_a_stride_below_one():
    with pytest.raises(InputError, match="slice_stride"):
        next(iter(segment(_ball_volume(), "pixeldrl_wm", 1, "cpu", slice_stride=0, match_levels=False)))


def test_the_command_takes_a_stride_and_refuses_zero(tmp_path, capsys):
    from cli_support import assert_one_error
    from steprl import io
    from steprl.cli import main

    path = tmp_path / "ball.nii.gz"
    io.write_image(_ball_volume(), path)
    assert_one_error(main(["segment", str(path), "--out", str(tmp_path / "a"), "--slice-stride", "0"]),
                     capsys.readouterr().err, ["--slice-stride", "0"])
    assert not (tmp_path / "a").exists()
    assert main(["segment", str(path), "--out", str(tmp_path / "b"), "--slice-stride", "3", "--steps", "1",
                 "--no-match-levels", "--quiet"]) == 0
    assert (tmp_path / "b" / "labelmap.nii.gz").is_file()
