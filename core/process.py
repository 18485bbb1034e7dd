"""A service started as a subprocess: wait until it is ready, stop it for sure.

Used by the demo and the end-to-end tests to run `phishgate serve ...` the way an operator
would, with the output in a log file.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from phishgate.core.errors import PhishgateError


class ServiceFailed(PhishgateError):
    """A service exited or did not become ready in time; the message ends with its log."""


class ServiceProcess:
    """One subprocess with stdout and stderr appended to `log`."""

    def __init__(
        self, args: list[str], env: Mapping[str, str], log: Path, cwd: Path | None = None
    ) -> None:
        self.args, self.env, self.log, self.cwd = args, dict(env), log, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return " ".join(Path(self.args[0]).name.split() + self.args[1:])

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def start(self, ready: Callable[[], bool], timeout_s: float = 180) -> None:
        """Start it and poll `ready` until true; ServiceFailed if it exits or times out."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd
            )
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.proc.poll() is not None:
                raise ServiceFailed(
                    f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceFailed(
                    f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        """Send `sig`, wait up to `timeout_s`, then kill. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
