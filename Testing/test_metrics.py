"""steprl.metrics against independent implementations (SimpleITK, brute force) and known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist
from steprl import metrics as M
from steprl.errors import InputError
from steprl.geometry import Geometry
from steprl.spatial import jacobian_determinant, voxel_to_physical


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64)
    return sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(len(shape))) <= 1.0


def _sitk(array: np.ndarray, spacing_xyz) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    return image


# ---- Dice -------------------------------------------------------------------------------------
def test_dice_hand_computed():
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    ref = np.array([[0, 1, 0], [2, 2, 2]])
    scores = M.dice_per_label(pred, ref)
    assert set(scores) == {1, 2}
    assert scores[1] == pytest.approx(2 * 1 / (2 + 1))
    assert scores[2] == pytest.approx(2 * 2 / (2 + 3))
    assert M.mean_dice(pred, ref) == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_dice_absent_labels_and_inputs():
    pred = np.array([[0, 1, 3], [0, 1, 0]])
    ref = np.array([[0, 1, 0], [0, 1, 4]])
    scores = M.dice_per_label(pred, ref)
    assert scores == {1: 1.0, 3: 0.0, 4: 0.0}  # 3 only in pred, 4 only in ref
    assert M.dice_per_label(pred, ref, labels=[1, 7]) == {1: 1.0}  # 7 absent from both: skipped
    assert math.isnan(M.mean_dice(np.zeros((3, 3)), np.zeros((3, 3))))
    # float label maps holding whole numbers are accepted, fractional ones are not
    assert M.dice_per_label(pred.astype(np.float32), ref.astype(np.float64)) == scores
    with pytest.raises(InputError):
        M.dice_per_label(pred + 0.5, ref)
    with pytest.raises(InputError):
        M.dice_per_label(pred, ref[:, :2])


def test_binary_dice_follows_the_one_empty_rule_for_numpy_and_torch():
    a = np.zeros((4, 5), np.uint8)
    a[1:3, 1:4] = 1  # 6 voxels
    b = np.zeros_like(a)
    b[2:4, 1:4] = 2  # 6 voxels, 3 shared; any non-zero value is foreground
    assert M.dice(a, b) == pytest.approx(0.5)
    assert M.dice(torch.from_numpy(a), torch.from_numpy(b) > 0) == pytest.approx(0.5)
    assert M.dice(a, b) == M.segmentation_metrics(a, b, (1.0, 1.0))["dice"] == M.dice_per_label(a > 0, b > 0)[1]
    empty = np.zeros_like(a)
    assert M.dice(empty, empty) == 1.0 and M.segmentation_metrics(empty, empty, (1.0, 1.0))["dice"] == 1.0
    assert M.dice(a, empty) == 0.0 and M.dice(empty, a) == 0.0
    assert M.dice_per_label(empty, empty) == {} and math.isnan(M.mean_dice(empty, empty))  # nothing to score
    with pytest.raises(InputError):
        M.dice(a, a[:3])


def test_dice_matches_sitk_label_overlap():
    rng = np.random.default_rng(1)
    ref = ndimage.median_filter(rng.integers(0, 5, (12, 14, 16)), size=3).astype(np.int32)
    pred = ref.copy()
    flip = rng.random(ref.shape) < 0.2
    pred[flip] = rng.integers(0, 6, int(flip.sum()))  # label 5 appears only in pred
    ours = M.dice_per_label(pred, ref)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(_sitk(pred, (1, 1, 1)), _sitk(ref, (1, 1, 1)))  # (source, target)
    for label in range(1, 5):
        assert ours[label] == pytest.approx(overlap.GetDiceCoefficient(label), abs=1e-9)
    assert ours[5] == 0.0


# ---- HD95 -------------------------------------------------------------------------------------
def _brute_hd95(pred: np.ndarray, ref: np.ndarray, spacing_xyz) -> tuple[float, float]:
    """(HD95, HD100) from all pairwise distances (mm) between surface voxel centres."""
    scale = np.asarray(spacing_xyz, dtype=np.float64)[::-1]

    def surface(mask):
        return np.argwhere(mask & ~ndimage.binary_erosion(mask)) * scale

    d = cdist(surface(pred), surface(ref))
    to_ref, to_pred = d.min(axis=1), d.min(axis=0)
    return (max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)), max(to_ref.max(), to_pred.max()))


@pytest.mark.parametrize(
    "shape, spacing_xyz, pred_args, ref_args",
    [
        ((26, 28, 30), (0.7, 1.3, 2.1), ((12, 13, 14), (6, 9, 8)), ((14, 12, 16), (7, 6, 10))),
        ((40, 44), (0.5, 1.7), ((20, 20), (9, 14)), ((17, 24), (12, 8))),
    ],
)
def test_hd95_matches_brute_force_and_sitk_bound(shape, spacing_xyz, pred_args, ref_args):
    pred, ref = _ellipsoid(shape, *pred_args), _ellipsoid(shape, *ref_args)
    expected, expected_max = _brute_hd95(pred, ref, spacing_xyz)
    ours = M.hd95(pred, ref, spacing_xyz)
    assert ours == pytest.approx(expected, rel=1e-5)
    assert ours != pytest.approx(_brute_hd95(pred, ref, spacing_xyz[::-1])[0], rel=1e-3)  # axis order matters
    hausdorff = sitk.HausdorffDistanceImageFilter()
    hausdorff.Execute(_sitk(pred.astype(np.uint8), spacing_xyz), _sitk(ref.astype(np.uint8), spacing_xyz))
    assert ours <= hausdorff.GetHausdorffDistance() + 1e-6
    assert expected_max == pytest.approx(hausdorff.GetHausdorffDistance(), rel=1e-6)


def test_hd95_parallel_plates_known_distance():
    # one-voxel-thick plates (every voxel is surface) 4 slices apart along array axis 0 = ITK z
    pred = np.zeros((12, 9, 10), bool)
    ref = np.zeros_like(pred)
    pred[3, 2:7, 1:8] = True
    ref[7, 2:7, 1:8] = True
    assert M.hd95(pred, ref, (0.8, 1.1, 2.5)) == pytest.approx(4 * 2.5, rel=1e-6)
    # 2D: two horizontal segments 3 rows apart, row spacing (ITK y) 1.5 mm
    a = np.zeros((10, 12), bool)
    b = np.zeros_like(a)
    a[2, 1:11] = True
    b[5, 1:11] = True
    assert M.hd95(a, b, (0.4, 1.5)) == pytest.approx(3 * 1.5, rel=1e-6)
    assert M.hd95(a, a, (0.4, 1.5)) == 0.0


def test_hd95_empty_and_per_label():
    empty = np.zeros((8, 8), bool)
    blob = np.zeros_like(empty)
    blob[2:5, 2:6] = True
    assert M.hd95(empty, empty, (1, 1)) == 0.0
    assert math.isnan(M.hd95(blob, empty, (1, 1)))
    assert math.isnan(M.hd95(empty, blob, (1, 1)))
    with pytest.raises(InputError):
        M.hd95(blob, blob, (1, 1, 1))

    shape, spacing = (20, 22, 24), (1.2, 0.9, 2.0)
    pred = np.zeros(shape, np.int16)
    ref = np.zeros(shape, np.int16)
    pred[_ellipsoid(shape, (6, 7, 8), (4, 5, 5))] = 1
    ref[_ellipsoid(shape, (7, 7, 9), (4, 4, 6))] = 1
    pred[_ellipsoid(shape, (14, 15, 16), (3, 4, 5))] = 2
    ref[_ellipsoid(shape, (14, 14, 15), (4, 4, 4))] = 2
    pred[0, 0, 0] = 3  # label 3 only in the prediction
    scores = M.hd95_per_label(pred, ref, spacing)
    assert set(scores) == {1, 2, 3}
    for label in (1, 2):
        assert scores[label] == pytest.approx(_brute_hd95(pred == label, ref == label, spacing)[0], rel=1e-5)
    assert math.isnan(scores[3])
    assert set(M.hd95_per_label(pred, ref, spacing, labels=[2, 9])) == {2}


# ---- Jacobian ---------------------------------------------------------------------------------
def test_jacobian_stats_match_sitk_on_smooth_field():
    rng = np.random.default_rng(2)
    shape, spacing = (14, 16, 18), (0.8, 1.5, 2.2)  # numpy (D, H, W); ITK (x, y, z)
    noise = rng.standard_normal((3, *shape))
    field = np.stack([ndimage.gaussian_filter(c, 2.0) for c in noise]) * 20.0  # voxels; folds a few %
    voxel = torch.from_numpy(field)[None]
    geometry = Geometry(shape, spacing, (0.0, 0.0, 0.0), np.eye(3))
    ours = jacobian_determinant(voxel)[0].numpy()
    physical = voxel_to_physical(voxel, geometry)[0].numpy()  # (3, D, H, W), mm, components x, y, z
    image = sitk.GetImageFromArray(np.moveaxis(physical, 0, -1), isVector=True)
    image.SetSpacing(spacing)
    theirs = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(image))
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(ours[inner], theirs[inner], rtol=1e-5, atol=1e-5)
    ours_stats, sitk_stats = M.jacobian_stats(ours[inner]), M.jacobian_stats(theirs[inner])
    assert set(ours_stats) == {"folding_percent", "std_log_jacobian"}
    assert 0.0 < ours_stats["folding_percent"] < 50.0  # the field does fold somewhere
    assert ours_stats["folding_percent"] == pytest.approx(sitk_stats["folding_percent"], abs=0.05)
    assert ours_stats["std_log_jacobian"] == pytest.approx(sitk_stats["std_log_jacobian"], rel=1e-3)


def test_folding_percent_hand_built_fields():
    # 3D: only the w-component, u_w = c * w, so det J = 1 + c exactly (every row else is identity)
    d, h, w = 8, 6, 7
    field = torch.zeros(1, 3, d, h, w, dtype=torch.float64)
    ramp = torch.arange(w, dtype=torch.float64)
    field[0, 2, :3] = -2.0 * ramp  # det = -1: folded
    field[0, 2, 3:5] = -1.0 * ramp  # det = 0: collapsed, counts as folded
    field[0, 2, 5:] = 0.5 * ramp  # det = 1.5
    det = jacobian_determinant(field)
    assert M.folding_percent(det) == pytest.approx(100.0 * 5 / 8)
    # 2D: the h-component u_h = -3 h on a third of the columns -> det -2 there
    field2 = torch.zeros(1, 2, 9, 12, dtype=torch.float64)
    field2[0, 0, :, :4] = -3.0 * torch.arange(9, dtype=torch.float64)[:, None]
    assert M.folding_percent(jacobian_determinant(field2)) == pytest.approx(100.0 / 3)
    assert M.folding_percent(np.ones((4, 4))) == 0.0


def test_std_log_jacobian_known_values_and_clip():
    assert M.std_log_jacobian(np.array([math.e, 1 / math.e] * 4)) == pytest.approx(1.0)
    assert M.std_log_jacobian(np.ones((3, 3, 3))) == 0.0
    clipped = M.std_log_jacobian(np.array([0.0, -5.0, 1.0, 1.0]))  # both folded -> log(1e-9)
    assert math.isfinite(clipped)
    assert clipped == pytest.approx(abs(math.log(1e-9)) / 2)
    with pytest.raises(InputError):
        M.folding_percent(np.array([]))


# ---- NCC --------------------------------------------------------------------------------------
def _brute_local_ncc(a: np.ndarray, b: np.ndarray, window) -> float:
    """Mean Pearson correlation over windows clipped to the image, one voxel at a time."""
    radii = [k // 2 for k in window]
    values = []
    for index in np.ndindex(a.shape):
        box = tuple(slice(max(i - r, 0), i + r + 1) for i, r in zip(index, radii, strict=True))
        x, y = a[box].ravel(), b[box].ravel()
        x, y = x - x.mean(), y - y.mean()
        values.append((x * y).mean() / math.sqrt((x * x).mean() * (y * y).mean()))
    return float(np.mean(values))


@pytest.mark.parametrize("shape, window", [((13, 15), (5, 5)), ((7, 8, 9), (3, 3, 3)), ((9, 10), (3, 5))])
def test_local_ncc_matches_brute_force(shape, window):
    rng = np.random.default_rng(3)
    a = rng.random(shape)
    b = 0.6 * a + 0.4 * rng.random(shape)
    expected = _brute_local_ncc(a, b, window)
    arg = window[0] if len(set(window)) == 1 else window
    ours = M.local_ncc(torch.from_numpy(a)[None, None].float(), torch.from_numpy(b)[None, None].float(), arg)
    assert ours.shape == ()
    assert float(ours) == pytest.approx(expected, abs=2e-4)


def test_local_ncc_identity_negation_affine_invariance():
    torch.manual_seed(0)
    a = torch.rand(2, 1, 10, 11, 12)
    b = 0.5 * a + 0.5 * torch.rand_like(a)
    assert float(M.local_ncc(a, a)) == pytest.approx(1.0, abs=1e-4)
    assert float(M.local_ncc(a, -a)) == pytest.approx(-1.0, abs=1e-4)
    base = float(M.local_ncc(a, b, window=5))
    assert 0.2 < base < 0.95
    for scale, offset in ((3.0, -7.0), (0.01, 100.0)):
        assert float(M.local_ncc(scale * a + offset, b, window=5)) == pytest.approx(base, abs=1e-4)
    per_item = M.local_ncc(a, b, window=5, reduction="none")
    assert per_item.shape == (2,)
    assert float(per_item.mean()) == pytest.approx(base, abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float32 regardless
        assert float(M.local_ncc(a, b, window=5)) == pytest.approx(base, abs=1e-6)


def test_local_ncc_whole_image_window_is_global_ncc():
    torch.manual_seed(1)
    a = torch.rand(3, 1, 6, 7)
    b = torch.rand(3, 1, 6, 7) + a
    local = M.local_ncc(a, b, window=(11, 13), reduction="none")  # every clipped window = the image
    np.testing.assert_allclose(local.numpy(), M.global_ncc(a, b, reduction="none").numpy(), atol=1e-5)
    corr = [np.corrcoef(a[i].ravel().numpy(), b[i].ravel().numpy())[0, 1] for i in range(3)]
    assert float(M.global_ncc(a, b)) == pytest.approx(float(np.mean(corr)), abs=1e-5)
    assert float(M.global_ncc(a, torch.ones_like(a))) == 0.0


def test_local_ncc_gradient():
    torch.manual_seed(2)
    fixed = torch.rand(1, 1, 6, 7, 5, dtype=torch.float64)
    moving = torch.rand(1, 1, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    loss = -M.local_ncc(fixed, moving, window=3)
    loss.backward()
    assert moving.grad is not None and torch.isfinite(moving.grad).all() and moving.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda m: M.local_ncc(fixed, m, window=3), (moving,))
    flat = torch.zeros(1, 1, 6, 7, 5, requires_grad=True)  # e.g. a warp that left only padding
    value = M.local_ncc(fixed.float(), flat)
    value.backward()
    assert value.detach().item() == 0.0 and torch.isfinite(flat.grad).all()


def test_ncc_rejects_bad_inputs():
    a = torch.rand(1, 1, 5, 5)
    with pytest.raises(InputError):
        M.local_ncc(a, torch.rand(1, 1, 5, 6))
    with pytest.raises(InputError):
        M.local_ncc(a, a, window=4)
    with pytest.raises(InputError):
        M.global_ncc(torch.rand(1, 2, 5, 5), torch.rand(1, 2, 5, 5))


# ---- segmentation -----------------------------------------------------------------------------
def test_segmentation_metrics_overlapping_rectangles():
    ref = np.zeros((50, 50), bool)
    pred = np.zeros_like(ref)
    ref[10:30, 10:30] = True  # 400 px
    pred[15:35, 10:40] = True  # 600 px, 15 x 20 = 300 px inside ref
    tp, fp, fn = 300, 300, 100
    m = M.segmentation_metrics(pred, ref, (1.0, 1.0))
    assert set(m) == {"dice", "ppv", "sen", "iou", "biou", "hd95"}
    assert m["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["ppv"] == pytest.approx(tp / (tp + fp))
    assert m["sen"] == pytest.approx(tp / (tp + fn))
    assert m["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert m["hd95"] == pytest.approx(M.hd95(pred, ref, (1.0, 1.0)))
    assert 0.0 < m["biou"] < 1.0


def test_segmentation_metrics_empty_masks():
    empty = np.zeros((6, 7, 8), bool)
    blob = empty.copy()
    blob[2:4, 2:5, 3:6] = True
    both = M.segmentation_metrics(empty, empty, (1, 1, 1))
    assert both == {"dice": 1.0, "ppv": 1.0, "sen": 1.0, "iou": 1.0, "biou": 1.0, "hd95": 0.0}
    for pred, ref in ((blob, empty), (empty, blob)):
        one = M.segmentation_metrics(pred, ref, (1, 1, 1))
        assert all(one[k] == 0.0 for k in ("dice", "ppv", "sen", "iou", "biou"))
        assert math.isnan(one["hd95"])


def test_boundary_iou_small_objects_equal_iou():
    # 200 x 200 image: d = round(0.02 * 283) = 6, so objects at most 12 px wide are all boundary
    pred = np.zeros((200, 200), bool)
    ref = np.zeros_like(pred)
    pred[50:60, 50:62] = True
    ref[52:62, 50:60] = True
    assert np.array_equal(M.boundary_region(pred), pred)
    m = M.segmentation_metrics(pred, ref, (1.0, 1.0))
    assert m["biou"] == pytest.approx(m["iou"])
    assert m["iou"] == pytest.approx(80 / 140)


def test_boundary_iou_boundary_only_error_is_penalised():
    ref = np.zeros((200, 200), bool)
    ref[40:160, 40:160] = True
    pred = ref.copy()
    pred[160, 40:160] = True  # one extra row along one edge
    m = M.segmentation_metrics(pred, ref, (1.0, 1.0))
    assert m["iou"] == pytest.approx(120 / 121)
    assert m["biou"] < m["iou"] - 0.02
    assert M.boundary_iou(ref, ref) == 1.0


@pytest.mark.parametrize("shape", [(60, 70), (24, 26, 28)])
def test_boundary_region_matches_chessboard_distance(shape):
    # independent: mask voxels whose chessboard distance to the background (outside included) is <= d
    mask = _ellipsoid(shape, [n / 2 for n in shape], [n / 3 for n in shape])
    mask[tuple(n // 2 for n in shape)] = False  # an inner hole has a contour too
    d = max(1, round(0.02 * math.sqrt(sum(n * n for n in shape))))
    distance = ndimage.distance_transform_cdt(np.pad(mask, 1), metric="chessboard")[(slice(1, -1),) * len(shape)]
    expected = mask & (distance <= d)
    np.testing.assert_array_equal(M.boundary_region(mask), expected)
