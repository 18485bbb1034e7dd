"""The self-description an adapter carries (DESIGN invariant 4).

Next to PEFT's `adapter_config.json` every adapter folder holds `phishgate-adapter.json`:
the base model id and weights hash it was trained on, the task and label set, the prompt
version and token budget, the decision threshold chosen on dev, the data hash, the git
commit and its eval metrics. A server loads an adapter only if `check_compatible` passes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phishgate.core.errors import AdapterMismatch, ConfigError
from phishgate.core.tasks import PROMPT_VERSION, get_task

MANIFEST = "phishgate-adapter.json"


@dataclass(frozen=True)
class AdapterManifest:
    """What an adapter says about itself; written by training, checked by serving."""

    task: str
    labels: tuple[str, ...]
    threshold: float
    prompt_version: str
    max_input_tokens: int
    base_model_id: str
    base_weights_hash: str
    data_hash: str = ""
    git_commit: str = ""
    created_at: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)

    @property
    def positive_label(self) -> str:
        return self.labels[-1]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterManifest:
        known = set(cls.__dataclass_fields__)
        missing = {"task", "labels", "threshold", "prompt_version", "base_model_id"} - set(data)
        if missing:
            raise ConfigError(f"adapter manifest lacks {', '.join(sorted(missing))}")
        values = {k: v for k, v in data.items() if k in known}
        values["labels"] = tuple(values["labels"])
        values.setdefault("max_input_tokens", 512)
        values.setdefault("base_weights_hash", "")
        return cls(**values)


def write_manifest(folder: Path, manifest: AdapterManifest) -> Path:
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(folder: Path) -> AdapterManifest:
    """The manifest of the adapter in `folder`; ConfigError naming what is wrong."""
    path = folder / MANIFEST
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"adapter {folder} has no {MANIFEST}; it cannot be served") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    return AdapterManifest.from_dict(data)


def check_compatible(
    manifest: AdapterManifest,
    *,
    base_weights_hash: str,
    prompt_version: str = PROMPT_VERSION,
) -> None:
    """AdapterMismatch unless the adapter was trained on this base model and prompt."""
    if manifest.prompt_version != prompt_version:
        raise AdapterMismatch(
            f"adapter for task {manifest.task!r} was trained with prompt version "
            f"{manifest.prompt_version!r}; this build renders {prompt_version!r}"
        )
    if manifest.base_weights_hash != base_weights_hash:
        raise AdapterMismatch(
            f"adapter for task {manifest.task!r} was trained on base model "
            f"{manifest.base_model_id}@{manifest.base_weights_hash[:8]}; "
            f"the loaded base model is @{base_weights_hash[:8]}"
        )
    task = get_task(manifest.task)
    if tuple(manifest.labels) != task.labels:
        raise AdapterMismatch(
            f"adapter labels {list(manifest.labels)} differ from task {task.name!r} "
            f"labels {list(task.labels)}"
        )
