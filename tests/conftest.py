"""Shared fixtures: the real base model, prepared once into the project's state folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from phishgate.core.settings import CoreSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def core_settings() -> CoreSettings:
    return CoreSettings(home=REPO_ROOT / "var")


@pytest.fixture(scope="session")
def prepared_model(core_settings: CoreSettings) -> Any:
    """The SmolLM2-135M-Instruct checkpoint in the local cache (prepared on first use)."""
    from phishgate.core.model import prepare_base_model

    return prepare_base_model(core_settings)


@pytest.fixture(scope="session")
def tokenizer(prepared_model: Any) -> Any:
    from phishgate.core.model import load_tokenizer

    return load_tokenizer(prepared_model.path)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"labelled corpora not found at {SHARED_DATA}")
    return SHARED_DATA
