"""Helpers of the tests that drive ``steprl`` in-process as a user would (bad inputs, output folders).

- :func:`run`: ``steprl ARGS`` through :func:`steprl.cli.main`; the exit code and stderr.
- :func:`assert_one_error`: a refusal is one ``error:`` line with the key words, and no traceback.
- :func:`forbid_model_loading`: make loading a model fail the test, to prove a refusal came
  before any work.
"""

from __future__ import annotations

from steprl.cli import main


def run(capsys, *argv) -> tuple[int, str]:
    """``steprl ARGV`` in-process (arguments turned into text): (exit code, stderr)."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_error(code: int, err: str, words: list[str], exit_code: int = 2) -> None:
    """The run exited with ``exit_code`` after one ``error:`` line holding every word (any case)."""
    assert code == exit_code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


def forbid_model_loading(monkeypatch) -> None:
    """Make the registration and segmentation model loaders fail the test when called."""
    import steprl.registration.model
    import steprl.segmentation.model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the run should have been refused before any work")

    monkeypatch.setattr(steprl.registration.model, "load_spac", refuse)
    monkeypatch.setattr(steprl.segmentation.model, "load_segmenter", refuse)
