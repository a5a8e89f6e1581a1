"""segment(): geometry kept (oblique too), slicing axes, batching, constant slices, model files, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from steprl import io
from steprl.errors import InputError, ModelFileError
from steprl.geometry import Geometry, Image
from steprl.modelfile import save_model
from steprl.segmentation.data import SyntheticSliceSource, in_plane_transposed, resolve_axis
from steprl.segmentation.inference import segment
from steprl.segmentation.model import load_segmenter
from steprl.segmentation.training import build_learner
from steprl.synth.toy import noisy_ellipse
from steprl.training.distributed import single_process

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _export(tmp_path, method="pixeldrl", name="model", size=(24, 24), **kwargs):
    """A small (untrained, a few updates) model file of ``method``; returns its path."""
    torch.manual_seed(0)
    source = SyntheticSliceSource(size, seed=0, val_count=2)
    extra = {"widths": (4, 8, 16, 32), "t_max": 3} if method == "pixeldrl" else {"unet_channels": (4, 8)}
    extra.update(kwargs)
    learner, _ = build_learner(method, source, single_process("cpu"), batch=2, iterations_per_epoch=5, **extra)
    learner.train_iteration(0)  # move the weights off their initialisation
    state, card = learner.export_model()
    return save_model(tmp_path / name, state, card)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("model"))


def _oblique_direction() -> np.ndarray:
    a, b = np.deg2rad(25.0), np.deg2rad(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _volume(shape=(5, 30, 26), seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pairs = [noisy_ellipse(shape[1:], rng) for _ in range(shape[0])]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def test_3d_output_keeps_the_input_geometry_oblique_too(model_path, tmp_path):
    image, labels = _volume()
    geometry = Geometry(image.shape, (0.7, 0.9, 2.5), (10.0, -5.0, 3.0), _oblique_direction())
    steps = list(segment(Image(image, geometry), model_path, steps=3, device="cpu",
                         labels=Image(labels, geometry)))
    assert [s.step for s in steps] == [0, 1, 2, 3]
    for s in steps:
        for out in (s.mask, s.changed):
            assert out.array.shape == image.shape and out.array.dtype == np.uint8
            assert out.geometry.matches(geometry, tol=0)
            assert np.array_equal(out.geometry.direction, geometry.direction)
        assert 0.0 <= s.metrics["dice"] <= 1.0
    assert steps[0].mask.array.all() and not steps[0].changed.array.any()  # f(0) = 1
    for previous, current in zip(steps, steps[1:]):
        assert np.array_equal(current.changed.array, previous.mask.array != current.mask.array)
    # origin and direction only decide WHICH axis is axial; the voxels are segmented the same way
    plain = Geometry(image.shape, geometry.spacing, (0.0, 0.0, 0.0), np.eye(3))
    again = list(segment(Image(image, plain), model_path, steps=3, device="cpu", axis=0))
    assert np.array_equal(again[-1].mask.array, steps[-1].mask.array)
    # written and read back with its geometry
    path = io.write_image(steps[-1].mask, tmp_path / "mask.nrrd")
    back = io.read_labels(path)
    assert back.geometry.matches(geometry, tol=1e-4) and np.array_equal(back.array, steps[-1].mask.array)


def test_slicing_axis_follows_the_orientation(model_path):
    image, _ = _volume((4, 24, 20), seed=1)
    # the same voxels stored with the axial axis last, array order (y, x, z): index axes (i, j, k) = (z, x, y)
    stored = np.ascontiguousarray(np.moveaxis(image, 0, 2))  # (24, 20, 4)
    permuted = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # columns: where i, j, k point
    geometry = Geometry(stored.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), permuted)
    axial = list(segment(Image(stored, geometry), model_path, steps=2, device="cpu", axis="axial"))[-1]
    explicit = list(segment(Image(stored, geometry), model_path, steps=2, device="cpu", axis=2))[-1]
    reference = list(segment(Image(image, Geometry(image.shape, (1, 1, 1), (0, 0, 0), np.eye(3))), model_path,
                             steps=2, device="cpu", axis=0))[-1]
    assert np.array_equal(axial.mask.array, explicit.mask.array)
    assert np.array_equal(np.moveaxis(axial.mask.array, 2, 0), reference.mask.array)


def test_slices_stored_transposed_are_read_the_training_way(model_path, caplog):
    """An axial slice whose rows run left-right on disk (array order z, x, y) is transposed for the network
    and back: the mask is the transposed mask of the same voxels stored z, y, x, exactly."""
    image, _ = _volume((4, 24, 20), seed=1)
    lps = list(segment(Image(image, Geometry(image.shape, (1, 1, 1), (0, 0, 0), np.eye(3))), model_path, steps=2,
                       device="cpu"))[-1].mask.array
    stored = np.ascontiguousarray(image.swapaxes(1, 2))  # (4, 20, 24): index axes (i, j, k) = (y, x, z)
    swapped = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    geometry = Geometry(stored.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), swapped)
    assert in_plane_transposed(geometry, resolve_axis("axial", geometry))
    assert not in_plane_transposed(Geometry(image.shape, (1, 1, 1), (0, 0, 0), np.eye(3)), 0)
    with caplog.at_level("INFO", logger="steprl.segmentation.inference"):
        mask = list(segment(Image(stored, geometry), model_path, steps=2, device="cpu"))[-1].mask.array
    assert mask.shape == stored.shape and np.array_equal(mask.swapaxes(1, 2), lps)
    assert "transposed for the network and back" in caplog.text
    # without the transposition the network would read other slices: the fixture model is not transpose-equivariant
    plain = list(segment(Image(stored, Geometry(stored.shape, (1, 1, 1), (0, 0, 0), np.eye(3))), model_path,
                         steps=2, device="cpu"))[-1].mask.array
    assert not np.array_equal(plain.swapaxes(1, 2), lps)


def test_batching_and_constant_slices(model_path):
    image, _ = _volume((6, 24, 24), seed=2)
    image[2] = 7.0  # a constant slice: background without running the network
    geometry = Geometry(image.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    one = list(segment(Image(image, geometry), model_path, steps=3, device="cpu", batch_slices=1, bf16=False))
    many = list(segment(Image(image, geometry), model_path, steps=3, device="cpu", batch_slices=16, bf16=False))
    for a, b in zip(one, many):
        assert np.array_equal(a.mask.array, b.mask.array)
    assert not many[-1].mask.array[2].any() and many[0].mask.array[2].all()
    done = []
    list(segment(Image(image, geometry), model_path, steps=1, device="cpu", batch_slices=2,
                 progress=lambda n, total: done.append((n, total))))
    assert done == [(2, 5), (4, 5), (5, 5)]


def test_model_files_round_trip(tmp_path):
    for method in ("pixeldrl", "unet"):
        torch.manual_seed(0)
        path = _export(tmp_path, method, name=method, size=(32, 32))
        loaded = load_segmenter(path)
        assert loaded.method == ("pixeldrl-mg" if method == "pixeldrl" else "unet")
        assert loaded.size == (32, 32) and loaded.card["ndim"] == 2
        # the weights in the file are the exported ones, tensor for tensor
        from safetensors.torch import load_file

        on_disk = load_file(str(path))
        for key, value in loaded.net.state_dict().items():
            assert torch.equal(value, on_disk[key])
        image = Image(noisy_ellipse((32, 32), np.random.default_rng(0))[0], Geometry((32, 32), (1, 1), (0, 0),
                                                                                     np.eye(2)))
        first = [s.mask.array for s in segment(image, path, steps=None, device="cpu", bf16=False)]
        second = [s.mask.array for s in segment(image, loaded, steps=None, device="cpu", bf16=False)]
        assert len(first) == (4 if method == "pixeldrl" else 2)  # the card's steps (3), or one for a U-Net
        assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_bad_input_gets_a_clear_error(model_path, tmp_path):
    geometry = Geometry((24, 24), (1.0, 1.0), (0.0, 0.0), np.eye(2))
    good = Image(noisy_ellipse((24, 24), np.random.default_rng(0))[0], geometry)
    with pytest.raises(InputError, match="same value"):
        next(iter(segment(Image(np.zeros((24, 24), np.float32), geometry), model_path, device="cpu")))
    with pytest.raises(InputError, match="components"):
        next(iter(segment(Image(np.random.rand(24, 24, 2).astype(np.float32), geometry), model_path, device="cpu")))
    with pytest.raises(InputError, match="label map"):
        small = Geometry((20, 24), (1.0, 1.0), (0.0, 0.0), np.eye(2))
        next(iter(segment(good, model_path, device="cpu", labels=Image(np.zeros((20, 24), np.uint8), small))))
    with pytest.raises(InputError, match="steps"):
        next(iter(segment(good, model_path, steps=-1, device="cpu")))
    with pytest.raises(InputError, match="too small|cannot be segmented"):
        tiny = Geometry((1, 24), (1.0, 1.0), (0.0, 0.0), np.eye(2))
        next(iter(segment(Image(np.arange(24, dtype=np.float32)[None], tiny), model_path, device="cpu")))
    # a model of another method: a SPAC registration model
    from steprl.registration.networks import SPACConfig, SPACPolicy

    cfg = SPACConfig(ndim=2, grid=(32, 32), channels=(4, 8), plan_dim=4)
    spac = save_model(tmp_path / "spac", SPACPolicy(cfg).state_dict(), {"method": "spac", "ndim": 2,
                                                                         "config": cfg.to_dict()})
    with pytest.raises(ModelFileError, match="spac model.*segmentation needs"):
        next(iter(segment(good, spac, device="cpu")))
    with pytest.raises(ModelFileError, match="not found|does not exist"):
        load_segmenter(tmp_path / "missing.safetensors")
    # 4D data cannot be read as an image
    import SimpleITK as sitk

    four_d = sitk.JoinSeries([sitk.GetImageFromArray(np.random.rand(3, 4, 5).astype(np.float32))] * 2)
    sitk.WriteImage(four_d, str(tmp_path / "4d.nii.gz"))
    with pytest.raises(InputError):
        io.read_image(tmp_path / "4d.nii.gz")
