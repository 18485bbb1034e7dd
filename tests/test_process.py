"""ServiceProcess: readiness, a clear error with the log when a service dies, a sure stop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from phishgate.core.process import ServiceFailed, ServiceProcess

SERVE = "import sys, time; print('ready', flush=True); time.sleep(60)"


def test_start_waits_for_ready_and_stop_terminates(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    with ServiceProcess([sys.executable, "-c", SERVE], {}, log) as service:
        service.start(lambda: "ready" in service.log_tail())
        assert service.running()
    assert not service.running()
    service.stop()  # twice is fine


def test_a_service_that_exits_fails_with_its_log(tmp_path: Path) -> None:
    service = ServiceProcess(
        [sys.executable, "-c", "import sys; print('bad config: port'); sys.exit(78)"],
        {},
        tmp_path / "svc.log",
    )
    with pytest.raises(ServiceFailed, match=r"exited \(78\)[\s\S]*bad config: port"):
        service.start(lambda: False)


def test_a_service_never_ready_times_out_and_is_stopped(tmp_path: Path) -> None:
    service = ServiceProcess([sys.executable, "-c", SERVE], {}, tmp_path / "svc.log")
    with pytest.raises(ServiceFailed, match="not ready after 1 s"):
        service.start(lambda: False, timeout_s=1)
    assert not service.running()
