"""Running the worker as a background process: reader threads, a line queue, whole-tree kill.

The logic talks to the worker only through the two small :class:`typing.Protocol` interfaces
below, so tests (and other front ends) can inject their own runner. The real one,
:class:`SubprocessRunner`, starts the command in its own process group (session) so that
Cancel kills the worker AND anything it started; two daemon threads read stdout (queued line
by line for the GUI timer to drain, never blocking it) and stderr (kept as a short tail for
error messages, and logged).

Example::

    runner = SubprocessRunner()
    handle = runner.start([sys.executable, "-m", "steprl", "worker", "job.json"])
    while not handle.finished():
        for line in handle.read_lines():
            print(line)
        time.sleep(0.1)
    print(handle.returncode(), handle.stderr_tail())
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

log = logging.getLogger(__name__)

#: Lines of stderr kept for error messages.
STDERR_TAIL_LINES = 40


class ProcessHandle(Protocol):
    """A started process whose stdout lines are read in the background."""

    pid: int

    def read_lines(self) -> list[str]:
        """Stdout lines received since the last call (without line ends); never blocks."""

    def finished(self) -> bool:
        """True once the process has exited AND all of its stdout has been read."""

    def returncode(self) -> int | None:
        """Exit status (negative: killed by that signal), None while running."""

    def stderr_tail(self) -> str:
        """The last lines the process wrote to stderr."""

    def kill(self, grace_seconds: float = 1.0) -> None:
        """Stop the process and every process it started; returns when they are gone."""


class ProcessRunner(Protocol):
    """Starts processes; the logic's one way to launch the worker."""

    def start(self, command: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: str | None = None) -> ProcessHandle:
        """Start ``command`` (argv list) with ``env`` (the whole environment) in ``cwd``."""


class SubprocessHandle:
    """:class:`ProcessHandle` over :class:`subprocess.Popen` (see the module docstring)."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._lines: queue.Queue[str] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stdout_thread = threading.Thread(target=self._read_stdout, name=f"worker-{self.pid}-stdout", daemon=True)
        self._stderr_thread = threading.Thread(target=self._read_stderr, name=f"worker-{self.pid}-stderr", daemon=True)
        self._stdout_thread.start()
        self._stderr_thread.start()

    def _read_stdout(self) -> None:
        for line in self._popen.stdout:  # ends at EOF, when the process (group) closed its stdout
            self._lines.put(line.rstrip("\r\n"))

    def _read_stderr(self) -> None:
        for line in self._popen.stderr:
            line = line.rstrip("\r\n")
            self._stderr.append(line)
            log.debug("worker %d: %s", self.pid, line)

    def read_lines(self) -> list[str]:
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                return lines

    def finished(self) -> bool:
        return self._popen.poll() is not None and not self._stdout_thread.is_alive() and self._lines.empty()

    def returncode(self) -> int | None:
        return self._popen.poll()

    def stderr_tail(self) -> str:
        self._stderr_thread.join(timeout=0.5 if self._popen.poll() is not None else 0)
        return "\n".join(self._stderr)

    def _signal_group(self, sig: int) -> None:
        # Only while the leader is not reaped (returncode None): its pid, hence the group id,
        # cannot have been reused by an unrelated process.
        if self._popen.returncode is not None:
            return
        try:
            os.killpg(self._popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _exited_unreaped(self) -> bool:
        """Whether the leader has exited, WITHOUT reaping it (so its group id stays reserved)."""
        try:
            return os.waitid(os.P_PID, self._popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def kill(self, grace_seconds: float = 1.0) -> None:
        if sys.platform == "win32":
            if self._popen.poll() is None:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.pid)], capture_output=True, check=False)
        elif self._popen.returncode is None:
            # SIGTERM lets the worker remove its temporary files; then SIGKILL whatever is left of
            # the group (children included) before the leader is reaped.
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + grace_seconds
            while not self._exited_unreaped() and time.monotonic() < deadline:
                time.sleep(0.01)
            self._signal_group(signal.SIGKILL)
        self._popen.wait()
        self._stdout_thread.join(timeout=5)
        self._stderr_thread.join(timeout=5)


class SubprocessRunner:
    """:class:`ProcessRunner` that starts real processes (its own group, pipes read by threads)."""

    def start(self, command: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: str | None = None) -> SubprocessHandle:
        kwargs: dict = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True
        log.info("Starting %s", " ".join(str(c) for c in command))
        popen = subprocess.Popen(
            [str(c) for c in command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None, cwd=cwd, text=True, encoding="utf-8", errors="replace",
            bufsize=1, **kwargs)
        return SubprocessHandle(popen)
