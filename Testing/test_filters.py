"""Separable filters as banded matrix products (:mod:`steprl.filters`) equal the padded convolutions
they replace, for both border rules, in 2D and 3D, with gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from steprl.filters import SHIFT_BOX_MAX, box_sum_axis, filter_axis, separable
from steprl.metrics import local_ncc
from steprl.synth.toy import gaussian_blur


def _conv_reference(t: torch.Tensor, axis: int, kernel: list[float], border: str) -> torch.Tensor:
    """The same 1D correlation by padding and a grouped convolution (the old implementation)."""
    nd, radius, channels = t.ndim - 2, len(kernel) // 2, t.shape[1]
    shape = [1] * nd
    shape[axis - 2] = len(kernel)
    weight = torch.tensor(kernel, dtype=t.dtype).view(1, 1, *shape).expand(channels, 1, *shape)
    pad = [0, 0] * nd
    pad[2 * (t.ndim - 1 - axis)] = pad[2 * (t.ndim - 1 - axis) + 1] = radius
    padded = F.pad(t, pad, mode="replicate") if border == "replicate" else F.pad(t, pad)
    conv = F.conv2d if nd == 2 else F.conv3d
    return conv(padded, weight, groups=channels)


@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (1, 2, 6, 8, 5)])
@pytest.mark.parametrize("border", ["replicate", "zero"])
def test_matrix_filter_equals_the_padded_convolution(shape, border):
    torch.manual_seed(0)
    t = torch.rand(*shape, dtype=torch.float64)
    kernel = [0.1, 0.5, 1.0, -0.25, 0.3]
    for axis in range(2, len(shape)):
        torch.testing.assert_close(filter_axis(t, axis, kernel, border), _conv_reference(t, axis, kernel, border))
    wide = [1.0] * 13  # a window wider than the axis (7, 8, 5 voxels)
    torch.testing.assert_close(filter_axis(t, 3, wide, border), _conv_reference(t, 3, wide, border))


def test_gradients_flow_through_the_matrix_filter():
    t = torch.rand(1, 1, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: separable(x, [[0.2, 0.6, 0.2], None, [1.0, 2.0, 1.0]], "zero"), (t,))


def test_gaussian_blur_keeps_constants_and_mass():
    constant = torch.full((1, 2, 10, 12, 9), 3.0)
    torch.testing.assert_close(gaussian_blur(constant, 2.0), constant)
    spike = torch.zeros(1, 1, 31, 31)
    spike[0, 0, 15, 15] = 1.0
    blurred = gaussian_blur(spike, 2.0)
    assert abs(blurred.sum().item() - 1.0) < 1e-5 and blurred[0, 0, 15, 15] == blurred.max()


def test_local_ncc_of_an_image_with_itself_and_its_negative():
    torch.manual_seed(1)
    x = gaussian_blur(torch.rand(2, 1, 16, 16, 16), 1.0)
    assert local_ncc(x, x, 5).item() > 0.99
    assert local_ncc(x, -x, 5).item() < -0.99
    with pytest.raises(ValueError, match="odd"):
        filter_axis(x, 2, [1.0, 1.0])


@pytest.mark.parametrize("k", [3, 5, 9, 13, SHIFT_BOX_MAX + 2])
def test_box_sum_equals_the_zero_border_filter_with_gradients(k):
    """The shifted-addition box sum (and its self-adjoint backward) equals the banded product,
    including boxes wider than the axis (13 and 17 on axes of 5-8 voxels)."""
    torch.manual_seed(2)
    t = torch.rand(1, 2, 6, 8, 5, dtype=torch.float64)
    for axis in (2, 3, 4):
        torch.testing.assert_close(box_sum_axis(t, axis, k), _conv_reference(t, axis, [1.0] * k, "zero"))
    x = t[:, :1, :4, :5, :3].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: box_sum_axis(box_sum_axis(v, 3, k), 4, k), (x,))
    assert torch.autograd.gradgradcheck(lambda v: box_sum_axis(v, 2, k), (x,))
    with pytest.raises(ValueError, match="odd"):
        box_sum_axis(t, 2, 4)
