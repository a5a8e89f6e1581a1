"""Tests of steprl.modelfile: round trip, every refusal, strict state-dict checks, torch-free cards."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from steprl import modelfile
from steprl.atomic import TEMP_PREFIX
from steprl.errors import ModelFileError
from torch import nn

CARD = {"method": "spac", "ndim": 3, "config": {"width": 4}, "licence": "CC-BY-4.0"}


def _net(width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, width, 3), nn.ReLU(), nn.Conv3d(width, 3, 1))


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    net = _net()
    path = modelfile.save_model(tmp_path / "spac_toy", net.state_dict(), CARD)
    return path, net


def test_round_trip(saved, tmp_path):
    path, net = saved
    assert path == tmp_path / "spac_toy.safetensors" and (tmp_path / "spac_toy.json").is_file()
    for given in (path, tmp_path / "spac_toy.json", tmp_path / "spac_toy"):
        state, card = modelfile.load_model(given, method="spac", ndim=3)
        assert state.keys() == net.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert card["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["format"] == "steprl-model" and card["format_version"] == 1
    assert card["parameters"] == sum(p.numel() for p in net.parameters())
    assert card["licence"] == "CC-BY-4.0" and card["config"] == {"width": 4}
    assert card["created"].endswith("+00:00") and "steprl_version" in card
    assert "sha256" not in CARD  # the caller's dict is not modified
    fresh = _net()
    modelfile.check_state_dict(fresh, state, path)
    assert torch.equal(fresh[0].weight, net[0].weight)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(f"{TEMP_PREFIX}*"))
    umask = os.umask(0)
    os.umask(umask)
    for written in (path, path.with_suffix(".json")):  # shareable, as any file the user writes
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_requires_card_keys(tmp_path):
    for missing in ("method", "ndim", "config"):
        card = {k: v for k, v in CARD.items() if k != missing}
        with pytest.raises(ValueError, match=missing):
            modelfile.save_model(tmp_path / "m", {"w": torch.zeros(1)}, card)
    with pytest.raises(ValueError, match="ndim"):
        modelfile.save_model(tmp_path / "m", {"w": torch.zeros(1)}, {**CARD, "ndim": 4})
    assert not list(tmp_path.iterdir())


def test_stem_with_dots_and_noncontiguous_tensors(tmp_path):
    weight = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
    path = modelfile.save_model(tmp_path / "spac.v2", {"w": weight, "tied": weight}, CARD)
    assert path.name == "spac.v2.safetensors"
    state, _ = modelfile.load_model(tmp_path / "spac.v2")
    assert torch.equal(state["w"], weight) and torch.equal(state["tied"], weight)


def test_flipped_byte_is_a_checksum_error(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupt or was modified") as info:
        modelfile.load_model(path)
    assert "re-download or re-export" in str(info.value).lower()


def test_truncated_file_is_refused(saved):
    path, _ = saved
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ModelFileError, match="corrupt"):
        modelfile.load_model(path)


def _rewrite_card(path, **changes):
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card.update(changes)
    card_path.write_text(json.dumps(card))


def test_unreadable_header_is_refused(saved):
    path, _ = saved
    path.write_bytes(b"\xff" * 64)  # checksum made to match: the header itself is the problem
    _rewrite_card(path, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        modelfile.load_model(path)


def test_pickle_renamed_safetensors_is_never_unpickled(saved, monkeypatch):
    path, net = saved
    with open(path, "wb") as f:
        pickle.dump({"weights": [1.0, 2.0]}, f)
    _rewrite_card(path, sha256=hashlib.sha256(path.read_bytes()).hexdigest())

    def forbidden(*args, **kwargs):
        raise AssertionError("a model file was unpickled")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ModelFileError, match="never loads pickled"):
        modelfile.load_model(path)


def test_missing_files(saved, tmp_path):
    path, _ = saved
    with pytest.raises(ModelFileError, match="does not exist"):
        modelfile.load_model(tmp_path / "nothing.safetensors")
    path.with_suffix(".json").unlink()
    with pytest.raises(ModelFileError, match="card .* does not exist") as info:
        modelfile.load_model(path)
    assert "side by side" in str(info.value)


def test_bad_cards(saved):
    path, _ = saved
    card_path = path.with_suffix(".json")
    card_path.write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        modelfile.read_card(path)
    card_path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ModelFileError, match="not a StepRL model card"):
        modelfile.read_card(path)


def test_newer_format_version_asks_for_update(saved):
    path, _ = saved
    _rewrite_card(path, format_version=modelfile.FORMAT_VERSION + 1)
    with pytest.raises(ModelFileError, match="Update steprl"):
        modelfile.load_model(path)


def test_wrong_method_and_ndim(saved):
    path, _ = saved
    with pytest.raises(ModelFileError) as info:
        modelfile.load_model(path, method="pixeldrl-mg")
    assert "is a spac model, the segmentation needs a pixeldrl-mg model" in str(info.value)
    _rewrite_card(path, method="pixeldrl-mg")  # the card's method is not hashed: no checksum error
    with pytest.raises(ModelFileError, match="is a pixeldrl-mg model, the registration needs a spac model"):
        modelfile.load_model(path, method="spac")
    state, _ = modelfile.load_model(path, method=["unet", "pixeldrl-mg"])
    assert state
    with pytest.raises(ModelFileError, match="3D model given for a 2D image"):
        modelfile.load_model(path, ndim=2)


def test_check_state_dict_names_the_tensors(saved):
    path, _ = saved
    state, _ = modelfile.load_model(path)
    with pytest.raises(ModelFileError, match=r"mis-shaped tensors: 0\.weight") as info:
        modelfile.check_state_dict(_net(width=5), state, path)
    assert "config does not match" in str(info.value)
    with pytest.raises(ModelFileError, match=r"missing tensors: 2\.bias"):
        modelfile.check_state_dict(_net(), {k: v for k, v in state.items() if k != "2.bias"}, path)
    with pytest.raises(ModelFileError, match=r"unexpected tensors: extra"):
        modelfile.check_state_dict(_net(), {**state, "extra": torch.zeros(1)}, path)


def test_list_models_skips_invalid(saved, tmp_path, caplog):
    path, _ = saved
    (tmp_path / "orphan.safetensors").write_bytes(b"x")  # no card
    (tmp_path / "notes.json").write_text("{}")  # not a model: ignored silently
    with caplog.at_level(logging.WARNING):
        found = modelfile.list_models(tmp_path)
    assert [p for p, _ in found] == [path]
    assert found[0][1]["method"] == "spac"
    assert "orphan" in caplog.text
    assert modelfile.list_models(tmp_path / "absent") == []


def test_read_card_does_not_import_torch(saved):
    path, _ = saved
    code = textwrap.dedent(
        f"""
        import sys
        import steprl.modelfile as m
        card = m.read_card({str(path)!r})
        assert card["method"] == "spac", card
        assert len(m.list_models({str(path.parent)!r})) == 1
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_bundle_tool_merges_nested_card_entries_and_protects_trained_keys():
    """An extra card adds to nested entries (a lost inference grid would break the model) and
    cannot change what the weights depend on."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "trainer" / "tools" / "bundle_model.py"
    spec = importlib.util.spec_from_file_location("bundle_model", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    card = {"method": "spac", "config": {"grid": [64, 64]}, "inference": {"size": [96, 96], "steps": 10}}
    merged = tool.merge_card(card, {"inference": {"steps": 20}, "title": "T"})
    assert merged["inference"] == {"size": [96, 96], "steps": 20} and merged["title"] == "T"
    assert card["inference"]["steps"] == 10  # the input card is untouched
    with pytest.raises(ValueError, match="config"):
        tool.merge_card(card, {"config": {"grid": [32, 32]}})
