"""Connecting to Ray: an existing cluster when one is configured, else a private local one.

The local instance keeps its state (temp files, sockets, logs, the auth token) under the
project's state folder instead of ~/.ray and /tmp/ray (or, when that path is too long for
Unix sockets, in a folder of its own under the system temp dir), and keeps Ray's token
authentication on.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from pathlib import Path

from phishgate.core.settings import CoreSettings


def ray_state_dir(settings: CoreSettings) -> Path:
    return (settings.home / "ray").resolve()


def connect(settings: CoreSettings) -> str:
    """Initialise Ray for this process; return a description of what it connected to.

    Call it before importing any other part of Ray: Ray reads its authentication settings
    from the environment when it is first imported.
    """
    if settings.ray_address:
        import ray

        if not ray.is_initialized():
            ray.init(address=settings.ray_address, log_to_driver=True)
        return f"ray cluster at {settings.ray_address}"
    state = ray_state_dir(settings)
    state.mkdir(parents=True, exist_ok=True)
    token = state / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    # Read by Ray in this process and in the workers it starts.
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    # Ray runs its workers at nice 15, below its own daemons; with every core busy in
    # torch's threads, each wake-up of a daemon then stalls a whole parallel op (22% of the
    # training rate measured on 2 cores). The worker is the job here: run it at nice 0.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    if ray.is_initialized():
        return "ray (already initialised)"
    ray.init(
        include_dashboard=True,  # Ray Train polls the state API it serves (loopback only)
        dashboard_host="127.0.0.1",
        _temp_dir=str(_temp_dir(state)),
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
    return f"local ray (state in {state})"


# Ray puts Unix sockets under its temp dir; their paths must stay under 108 bytes, and a
# session folder name plus a socket name takes about 65.
_MAX_TEMP_DIR = 40


def _temp_dir(state: Path) -> Path:
    """`state`/tmp, or a short folder in the system temp dir when that path is too long."""
    preferred = state / "tmp"
    if len(str(preferred)) <= _MAX_TEMP_DIR:
        return preferred
    digest = hashlib.sha256(str(state).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"pg-ray-{digest}"


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
