"""Output folders tried as a hostile user would (issue 13): nothing the tool did not write is ever
deleted or changed, a bad ``--out`` is refused before any work, a run's outputs appear all at
once or not at all, and a terminated run leaves no staging folder behind.

The runs use the bundled 2D models on the bundled sample pair (well under a second each); "before
any work" is checked by making the model loaders fail the test if they are called.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_support import assert_one_error, forbid_model_loading, run
from steprl import outputfolder
from steprl.cli import main
from steprl.commands import SAMPLE_DIR
from steprl.errors import InputError

FIXED, MOVING = SAMPLE_DIR / "sample_fixed.nrrd", SAMPLE_DIR / "sample_moving.nrrd"


def register(out, *extra) -> list[str]:
    return ["register", str(FIXED), str(MOVING), "--model", "spac2d_brain", "--steps", "2", "--out", str(out),
            "--quiet", "--device", "cpu", *map(str, extra)]


def segment(out, *extra) -> list[str]:
    return ["segment", str(FIXED), "--model", "pixeldrl_wm", "--steps", "2", "--out", str(out), "--quiet",
            "--device", "cpu", *map(str, extra)]


def files_under(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a model is loaded: the refusal must come before any work."""
    forbid_model_loading(monkeypatch)


# ---- never delete what the tool did not write ------------------------------------------------
@pytest.mark.parametrize(("command", "skip_steps", "step_files"),
                         [(register, "--no-step-fields", 2), (segment, "--no-step-masks", 3)])  # + pixeldrl_wm's border
def test_a_users_steps_folder_survives(tmp_path, capsys, command, skip_steps, step_files):
    out = tmp_path / "X"
    (out / "steps").mkdir(parents=True)
    (out / "steps" / "mine.txt").write_text("keep")
    (out / "notes.txt").write_text("mine too")
    code, err = run(capsys, *command(out, skip_steps))
    assert code == 0, err
    assert (out / "steps" / "mine.txt").read_text() == "keep" and (out / "notes.txt").read_text() == "mine too"
    code, err = run(capsys, *command(out))  # with step files, into the same folder
    assert code == 0, err
    assert (out / "steps" / "mine.txt").read_text() == "keep"
    assert len(list((out / "steps").iterdir())) == 1 + step_files  # mine.txt and the step files


def test_a_rerun_replaces_only_the_files_of_the_previous_run(tmp_path, capsys):
    out = tmp_path / "X"
    assert run(capsys, *register(out))[0] == 0
    assert len(list((out / "steps").iterdir())) == 2
    (out / "steps" / "mine.txt").write_text("keep")
    assert run(capsys, *register(out, "--no-step-fields"))[0] == 0
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["mine.txt"]  # the old step fields went
    manifest = json.loads((out / outputfolder.MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["displacement.nii.gz", "metrics.json", "steps.png", "warped.nii.gz"]


def test_a_file_steprl_did_not_write_is_never_overwritten(tmp_path, capsys, no_model_loading):
    out = tmp_path / "X"
    out.mkdir()
    (out / "metrics.json").write_text("the user's own")
    code, err = run(capsys, *register(out))
    assert_one_error(code, err, ["metrics.json", "did not write"])
    assert files_under(out) == {"metrics.json": "the user's own"}


def test_an_empty_out_is_refused_and_the_current_folder_untouched(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit) as exit_info:
        main(register(""))
    assert exit_info.value.code == 2 and "empty" in capsys.readouterr().err
    assert files_under(tmp_path) == {"steps/mine.txt": "keep"}


# ---- a bad --out is refused before any work, without a traceback ---------------------------------
def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, no_model_loading):
    target = tmp_path / "result.txt"
    target.write_text("a file")
    for argv in (register(target), segment(target)):
        code, err = run(capsys, *argv)
        assert_one_error(code, err, ["result.txt", "existing file"])
    assert target.read_text() == "a file"


def test_out_under_a_file_is_refused_before_any_work(tmp_path, capsys, no_model_loading):
    (tmp_path / "file.nii.gz").write_text("an image")
    code, err = run(capsys, *register(tmp_path / "file.nii.gz" / "sub"))
    assert_one_error(code, err, ["file.nii.gz", "not a folder"])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write into read-only folders")
def test_out_in_a_read_only_folder_is_refused_before_any_work(tmp_path, capsys, no_model_loading):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for out in (locked, locked / "sub"):
            code, err = run(capsys, *register(out))
            assert_one_error(code, err, ["not writable"])
    finally:
        locked.chmod(0o755)


def test_a_folder_where_an_output_file_goes_is_refused_before_any_work(tmp_path, capsys, no_model_loading):
    out = tmp_path / "X"
    (out / "warped.nii.gz" / "x").mkdir(parents=True)
    code, err = run(capsys, *register(out))
    assert_one_error(code, err, ["warped.nii.gz"])
    assert [p.relative_to(out).as_posix() for p in sorted(out.rglob("*"))] == ["warped.nii.gz", "warped.nii.gz/x"]


def test_evaluate_json_into_a_folder_is_refused_before_the_evaluation(tmp_path, capsys, no_model_loading):
    code, err = run(capsys, "evaluate", "registration", "--images", FIXED, MOVING, "--json", tmp_path, "--quiet")
    assert_one_error(code, err, ["--json", "is a folder"])


def test_train_into_a_file_is_refused_before_training(tmp_path, capsys):
    target = tmp_path / "run.txt"
    target.write_text("a file")
    code, err = run(capsys, "train", "registration", "--synthetic", "16", "16", "--out", target, "--quiet")
    assert_one_error(code, err, ["run.txt", "existing file"])


# ---- all of a run's outputs, or none ---------------------------------------------------------------
def test_a_failed_publish_puts_the_previous_run_back(tmp_path, monkeypatch):
    out = tmp_path / "X"
    out.mkdir()
    for name in ("a.txt", "b.txt"):
        (out / name).write_text("old")
    (out / outputfolder.MANIFEST).write_text(json.dumps({"files": ["a.txt", "b.txt"]}))
    staging = outputfolder.staging_folder(out)
    for name in ("a.txt", "b.txt", "c.txt"):
        (staging / name).write_text("new")
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name == "b.txt" and Path(src).parent == staging:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(outputfolder.os, "replace", failing_replace)
    with pytest.raises(InputError, match="left as it was"):
        outputfolder.publish(staging, out)
    monkeypatch.setattr(outputfolder.os, "replace", real_replace)
    assert files_under(out) == {"a.txt": "old", "b.txt": "old",
                                outputfolder.MANIFEST: json.dumps({"files": ["a.txt", "b.txt"]})}


# ---- nothing left behind ----------------------------------------------------------------------------
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_folders_are_removed_by_their_marker_only(tmp_path):
    out = tmp_path / "X"
    dead = outputfolder.staging_folder(out)
    marker = json.loads((dead / outputfolder.STAGING_MARKER).read_text())
    (dead / outputfolder.STAGING_MARKER).write_text(json.dumps({**marker, "pid": _dead_pid()}))
    (dead / "big.nii.gz").write_text("left by a killed run")
    alive = outputfolder.staging_folder(out)  # this process: still running
    unmarked = tmp_path / ".X.partial-users"  # same pattern, no marker: not ours
    unmarked.mkdir()
    newest = outputfolder.staging_folder(out)
    assert not dead.exists()
    assert alive.is_dir() and unmarked.is_dir() and newest.is_dir()


def test_sigterm_removes_the_staging_folder(tmp_path):
    """``timeout`` and job schedulers send SIGTERM: the run ends like Ctrl-C, leaving nothing."""
    out = tmp_path / "X"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = ["register", str(FIXED), str(MOVING), "--model", "spac2d_brain", "--steps", "1000", "--out", str(out),
            "--quiet", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "steprl", *argv], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".X.partial-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be terminated"
    time.sleep(0.5)  # a few step fields are written
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not list(tmp_path.glob(".X.partial-*")) and not out.exists()


# ---- the files themselves -----------------------------------------------------------------------------
def test_every_output_is_readable_by_others_and_the_log_names_the_final_folder(tmp_path, capsys, caplog):
    out = tmp_path / "X"
    with caplog.at_level("DEBUG", logger="steprl"):
        code, err = run(capsys, *register(out))
    assert code == 0, err
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # steps.png was 0600
    messages = [r.getMessage() for r in caplog.records if r.levelno >= 20]
    assert messages and not [m for m in messages if ".partial-" in m], messages
