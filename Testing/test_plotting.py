"""Steps pictures: valid PNGs written atomically; slices and step selection."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from steprl import plotting
from steprl.synth import toy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_width: int) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert 5_000 < path.stat().st_size < 2_000_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        width, height = im.size
    assert width >= min_width and height >= 150
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_registration_steps_figure(tmp_path):
    pair = toy.synthetic_pair((40, 48), np.random.default_rng(0))
    steps = plotting.select_steps(10, 4)
    moving = [pair["moving"] * (1 - s / 10) + pair["fixed"] * (s / 10) for s in steps]
    curves = {"NCC": list(np.linspace(0.5, 0.9, 11)), "Dice": list(np.linspace(0.6, 0.8, 11))}
    out = plotting.registration_steps_figure(pair["fixed"], moving, steps, curves, tmp_path / "figs" / "steps.png",
                                             title="test")
    assert out == tmp_path / "figs" / "steps.png"
    _check_png(out, min_width=100 * len(steps))


def test_registration_figure_replaces_an_existing_file(tmp_path):
    path = tmp_path / "steps.png"
    path.write_bytes(b"old")
    image = np.random.default_rng(0).random((24, 24)).astype(np.float32)
    plotting.registration_steps_figure(image, [image], [0], {}, path)
    _check_png(path, min_width=200)


def test_segmentation_steps_picture(tmp_path):
    """The Pillow picture: one panel per step with the mask's outline in red and the changed pixels in
    magenta, a chart per metric, written atomically."""
    from steprl.segmentation.picture import CHANGED, OUTLINE, segmentation_steps_picture

    image, mask = toy.noisy_ellipse((48, 48), np.random.default_rng(0))
    masks = [image > 0.5, mask, mask]
    changed = [np.zeros_like(mask), masks[0] != masks[1], np.zeros_like(mask)]
    out = segmentation_steps_picture(image, masks, [0, 5, 10], {"Dice": [0.5 + 0.04 * i for i in range(11)]},
                                     tmp_path / "seg.png", changed=changed, title="a title")
    _check_png(out, min_width=300)
    with Image.open(out) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert (pixels == OUTLINE).all(axis=2).sum() > 3 * 40  # three outlines, each longer than 40 pixels

    def tinted(rgb: np.ndarray) -> int:  # pixels pulled toward the CHANGED colour (grey ones have r = g = b)
        toward = [(rgb[..., c].astype(int) - rgb[..., 1]) * (1 if CHANGED[c] > CHANGED[1] else 0) for c in (0, 2)]
        return int(np.sum((toward[0] > 60) & (toward[1] > 60)))

    assert tinted(pixels) > 50
    plain = segmentation_steps_picture(image, masks, [0, 5, 10], {}, tmp_path / "plain" / "seg.png")
    with Image.open(plain) as im:
        assert tinted(np.asarray(im.convert("RGB"))) == 0  # without changed pixels, nothing tinted


def test_segmentation_picture_keeps_pixel_proportions(tmp_path):
    from steprl.segmentation.picture import segmentation_steps_picture

    image = np.random.default_rng(1).random((30, 60)).astype(np.float32)
    mask = np.zeros((30, 60), dtype=bool)
    mask[10:20, 20:40] = True
    flat = segmentation_steps_picture(image, [mask], [1], {}, tmp_path / "a" / "flat.png")
    tall = segmentation_steps_picture(image, [mask], [1], {}, tmp_path / "b" / "tall.png", aspect=2.0)
    with Image.open(flat) as a, Image.open(tall) as b:
        assert b.size[1] > a.size[1]  # pixels twice as high as wide: a taller panel
    with pytest.raises(ValueError, match="step number"):
        segmentation_steps_picture(image, [mask, mask], [1], {}, tmp_path / "c.png")
    with pytest.raises(ValueError, match="shape"):
        segmentation_steps_picture(image, [mask[:, :10]], [1], {}, tmp_path / "d.png")


def test_figures_reject_bad_input(tmp_path):
    image = np.zeros((16, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="step number"):
        plotting.registration_steps_figure(image, [image, image], [0], {}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="2D"):
        plotting.registration_steps_figure(np.zeros((4, 16, 16)), [image], [0], {}, tmp_path / "b.png")
    from steprl.segmentation.picture import segmentation_steps_picture

    with pytest.raises(ValueError, match="shape"):
        segmentation_steps_picture(image, [np.zeros((8, 8))], [0], {}, tmp_path / "c.png")
    with pytest.raises(ValueError, match="2D"):
        segmentation_steps_picture(np.zeros((4, 16, 16)), [image], [0], {}, tmp_path / "d.png")
    assert list(tmp_path.iterdir()) == []


def test_representative_slice():
    volume = np.arange(5 * 6 * 7).reshape(5, 6, 7)
    assert plotting.representative_slice(volume).shape == (6, 7)
    np.testing.assert_array_equal(plotting.representative_slice(volume), volume[2])
    assert plotting.representative_slice(volume, axis=2).shape == (5, 6)
    np.testing.assert_array_equal(plotting.representative_slice(volume, axis=1), volume[:, 3, :])
    assert plotting.representative_slice(volume[0]).shape == (6, 7)


@pytest.mark.parametrize(
    ("n_steps", "k", "expected"),
    [(20, 5, [0, 5, 10, 15, 20]), (3, 5, [0, 1, 2, 3]), (0, 5, [0]), (10, 4, [0, 3, 7, 10]), (7, 2, [0, 7])],
)
def test_select_steps(n_steps, k, expected):
    assert plotting.select_steps(n_steps, k) == expected


def test_slice_aspect_gives_true_pixel_proportions():
    from steprl.plotting import slice_aspect

    spacing_xyz = (2.0, 3.0, 5.0)  # x, y, z mm; array axes (z, y, x)
    assert slice_aspect(spacing_xyz, 0) == pytest.approx(3.0 / 2.0)  # rows y, columns x
    assert slice_aspect(spacing_xyz, 1) == pytest.approx(5.0 / 2.0)  # rows z, columns x
    assert slice_aspect(spacing_xyz, 2) == pytest.approx(5.0 / 3.0)  # rows z, columns y
    assert slice_aspect((0.5, 1.5)) == pytest.approx(3.0)  # 2D: rows y, columns x
