"""Connecting to Ray: an existing cluster when one is configured, else a private local one.

The local instance keeps all its state (temp files, sockets, logs, the auth token) under
the project's state folder instead of ~/.ray and /tmp/ray, and keeps Ray's token
authentication on.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from phishgate.core.settings import CoreSettings


def ray_state_dir(settings: CoreSettings) -> Path:
    return (settings.home / "ray").resolve()


def connect(settings: CoreSettings) -> str:
    """Initialise Ray for this process; return a description of what it connected to."""
    import ray

    if ray.is_initialized():
        return "ray (already initialised)"
    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=True)
        return f"ray cluster at {settings.ray_address}"
    state = ray_state_dir(settings)
    state.mkdir(parents=True, exist_ok=True)
    token = state / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    # Ray reads these from the environment of this process and of the workers it starts.
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    ray.init(
        include_dashboard=False,
        _temp_dir=str(state / "tmp"),
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
    return f"local ray (state in {state})"


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
