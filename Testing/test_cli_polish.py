"""What a new user notices first (issue 13, small things): the help, ``info``, the defaults, the
picture's title, and whether the README's examples are what they claim to be."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
from steprl.cli import build_parser, main
from steprl.commands import SAMPLE_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
FIXED = SAMPLE_DIR / "sample_fixed.nrrd"


def test_help_lists_no_hidden_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "SUPPRESS" not in text and "worker" not in text
    assert "register" in text and "segment" in text


def test_info_is_readable_by_default(capsys):
    assert main(["info", "pixeldrl_wm"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("pixeldrl_wm: PixelDRL-MG")
    for label in ("task", "data", "licence", "metrics", "intended use", "limits", "sha256"):
        assert re.search(rf"^  {label} ", text, re.M), label
    assert len(text.splitlines()) < 60 and '"config"' not in text


def test_info_shows_a_registration_model_s_limits_and_its_calibration(capsys):
    """spac3d_brain's card says ``limits`` (not ``limitations``) and was calibrated after training: a user
    reading ``steprl info`` must see both, or the training command's --prior-sigma would mislead."""
    import json

    from steprl.modelfile import resolve_model_path

    card = json.loads(resolve_model_path("spac3d_brain").with_suffix(".json").read_text())
    assert main(["info", "spac3d_brain"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^  limits ", text, re.M)
    calibrated = re.search(r"^  calibrated +prior scale (\S+), sigma (\S+) voxels", text, re.M)
    assert calibrated, text
    cal = card["calibration"]
    assert (float(calibrated[1]), float(calibrated[2])) == (cal["chosen"], cal["chosen_sigma"])
    assert cal["chosen_sigma"] == card["config"]["prior_sigma"]
    assert len(text.splitlines()) < 60


def test_segment_uses_the_bundled_model_by_default(tmp_path, capsys):
    assert build_parser().parse_args(["segment", str(FIXED), "--out", "x"]).model == "pixeldrl_wm"
    assert main(["segment", str(FIXED), "--out", str(tmp_path / "out"), "--steps", "1", "--quiet"]) == 0
    assert "outputs in" in capsys.readouterr().out


def test_the_picture_names_the_axis_the_user_asked_for(tmp_path, monkeypatch):
    import steprl.segmentation.picture

    titles = []
    original = steprl.segmentation.picture.segmentation_steps_picture
    monkeypatch.setattr(steprl.segmentation.picture, "segmentation_steps_picture",
                        lambda *a, **k: titles.append(k["title"]) or original(*a, **k))
    volume = tmp_path / "volume.nrrd"
    sitk.WriteImage(sitk.JoinSeries([sitk.ReadImage(str(FIXED))] * 3), str(volume))
    for axis in ("axial", "1"):
        assert main(["segment", str(volume), "--model", "pixeldrl_wm", "--axis", axis, "--steps", "1", "--out",
                     str(tmp_path / axis), "--quiet"]) == 0
    assert re.search(r"axial slice \d+$", titles[0]) and "axis 0" not in titles[0], titles
    assert re.search(r"slice \d+ along array axis 1$", titles[1]), titles


def _readme_commands() -> list[str]:
    """Every ``steprl ...`` command the README shows, in code blocks and inline code."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    inline = re.findall(r"`(steprl [^`]+)`", README)
    return [line.strip() for line in text.splitlines() if "steprl " in line] + inline


def test_the_readme_self_check_is_quick(tmp_path):
    """The README's installation self-check finishes in about a minute at most (it once took 25)."""
    checks = [c for c in _readme_commands() if "--synthetic" in c and "self-check" in README.split(c)[1][:200]]
    assert checks, "the README names no quick self-check command"
    argv = shlex.split(checks[0])[1:]
    budget = {k: int(argv[argv.index(k) + 1]) for k in ("--epochs", "--iterations") if k in argv}
    assert budget.get("--epochs", 20) * budget.get("--iterations", 50) <= 10, checks[0]
    argv[argv.index("--out") + 1] = str(tmp_path / "check")
    start = time.perf_counter()
    assert main([*argv, "--quiet", "--no-tensorboard", "--device", "cpu"]) == 0
    assert time.perf_counter() - start < 120
    assert (tmp_path / "check" / "model_best.safetensors").is_file()


@pytest.mark.skipif(shutil.which("git") is None or not (REPO_ROOT / ".git").exists(), reason="needs a git checkout")
def test_gitignore_covers_the_readme_example_output_folders():
    outs = {shlex.split(c)[shlex.split(c).index("--out") + 1] for c in _readme_commands() if "--out" in c}
    outs.add(str(build_parser().parse_args(["demo"]).out))  # the demo's default folder
    assert {"demo_out", "result/"} <= outs
    for out in sorted(outs):
        probe = f"{out.rstrip('/')}/metrics.json"
        ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=REPO_ROOT).returncode == 0
        assert ignored, f"{out} (an example output folder of the README) is not in .gitignore"
