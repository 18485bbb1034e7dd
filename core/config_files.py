"""Reading configuration: YAML files and pydantic validation errors as one-line messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from phishgate.core.errors import ConfigError


def read_yaml_mapping(path: Path, kind: str) -> dict[str, Any]:
    """The mapping at the top of YAML file `path`; ConfigError naming the `kind` of file.

    An empty file is an empty mapping.
    """
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {kind} {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{kind} {path} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{kind} {path}: expected a mapping at the top level")
    return loaded


def describe_validation_error(exc: ValidationError, *, env_prefix: str = "") -> str:
    """`field.path: message` for each error, joined by "; ".

    With `env_prefix`, fields are named as environment variables (`PHISHGATE_HOME`).
    """
    problems = []
    for err in exc.errors():
        parts = [str(part) for part in err["loc"]]
        where = (env_prefix + "_".join(parts)).upper() if env_prefix and parts else ".".join(parts)
        message = str(err["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)
