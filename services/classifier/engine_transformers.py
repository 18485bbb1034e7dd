"""The transformers + PEFT engine: one base model, many LoRA adapters, mixed batches.

Adapters are loaded into one PeftModel under their versioned keys; a batch whose rows use
different adapters (or none) is one forward pass with PEFT's `adapter_names` argument
("__base__" for base-model rows); a batch of one adapter runs it as PEFT's active adapter,
without per-row routing. Rows are left padded with real-token positions and only
the last position's logits are computed (`phishgate.core.scoring.last_position_logits`),
so every row scores exactly as it would alone. The prompt prefixes given at construction
(each task's chat template and system prompt) are encoded once per adapter, and a row
that starts with one runs only the rest of its prompt.

With `compile=True`, batches of one adapter run through `torch.compile` (dynamic shapes),
which fuses the elementwise ops (RMSNorm, rotary, SiLU) eager mode runs one by one. Graphs
are compiled for every loaded adapter, for one row and for several, whenever an adapter
loads or unloads (PEFT's layers change, and every graph is guarded on them). Mixed and
base-only batches stay eager.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from phishgate.classifier.engine import EngineRow
from phishgate.core.model import load_causal_lm
from phishgate.core.scoring import (
    PromptPrefix,
    continues,
    encode_prefix,
    label_probabilities,
    last_position_logits,
)

BASE = "__base__"  # PEFT's name for "no adapter" in `adapter_names`
# Compiled graphs per adapter (dynamo guards on the active adapter's name): one for a single
# row, one for a dynamic batch size. Graphs outdated by later loads stay in dynamo's cache,
# so its limit is raised; past it, batches run eager.
_GRAPHS_PER_ADAPTER = 2
_COMPILED_GRAPHS_LIMIT = 64


class TransformersEngine:
    """Engine over a local Hugging Face checkpoint (CPU by default, CUDA if `device` says)."""

    name = "transformers"

    def __init__(
        self,
        base_path: Path,
        *,
        pad_id: int,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        threads: int = 0,
        prefixes: Sequence[Sequence[int]] = (),
        compile: bool = False,
    ) -> None:
        self._base: Any = load_causal_lm(base_path, dtype, threads=threads).to(device)
        self._peft: Any = None  # the PeftModel wrapping _base, once an adapter is loaded
        self._compile = compile
        self._compiled: Any = None  # with compile: torch.compile of _peft, once it exists
        if compile:
            import torch._dynamo as dynamo  # a plain `import torch.x` would shadow `torch` here

            limit = dynamo.config.cache_size_limit
            dynamo.config.cache_size_limit = max(limit, _COMPILED_GRAPHS_LIMIT)
        self._keys: set[str] = set()
        self._pad_id = pad_id
        self._device = torch.device(device)
        # Longest first, so a row takes the longest prefix it starts with.
        self._prefix_ids = sorted({tuple(p) for p in prefixes if p}, key=len, reverse=True)
        self._prefixes: dict[tuple[str, tuple[int, ...]], PromptPrefix] = {}

    def load_adapter(self, key: str, path: Path) -> None:
        if key == BASE or "." in key:
            raise ValueError(f"invalid adapter key {key!r}")
        if key in self._keys:
            raise ValueError(f"adapter key {key!r} is already loaded")
        if self._peft is None:
            from peft import PeftModel

            self._peft = PeftModel.from_pretrained(self._base, str(path), adapter_name=key)
            if self._compile:
                self._compiled = torch.compile(self._peft, dynamic=True)
        else:
            self._peft.load_adapter(str(path), adapter_name=key, is_trainable=False)
        self._peft.to(self._device)
        self._peft.eval()
        self._keys.add(key)
        for ids in self._prefix_ids:
            self._prefix(key, ids)
        self._compile_graphs()

    def _compile_graphs(self) -> None:
        """With compile: compile every loaded adapter's graphs now, so no request waits.

        Needed after every load and unload: PEFT's layers change, and every graph compiled
        so far is guarded on them.
        """
        if self._compiled is None:
            return
        # The shape requests take: a task prefix (reused states) and more than one token
        # after it (dynamo specialises sizes 0 and 1). Label ids: any, the scores are dropped.
        prompt = (*(self._prefix_ids[0] if self._prefix_ids else ()), *[self._pad_id] * 2)
        for key in sorted(self._keys):
            row = EngineRow(prompt, (0, 1), key)
            for n in range(1, _GRAPHS_PER_ADAPTER + 1):  # one row, then a batch
                self.score([row] * n)

    def unload_adapter(self, key: str) -> None:
        if key not in self._keys:
            raise KeyError(key)
        self._keys.discard(key)
        self._prefixes = {k: p for k, p in self._prefixes.items() if k[0] != key}
        if self._keys:
            with warnings.catch_warnings():  # "was active, now deleted": no adapter is active
                warnings.simplefilter("ignore", UserWarning)
                self._peft.delete_adapter(key)
            self._compile_graphs()
        else:
            # PEFT cannot delete its last adapter; take the LoRA layers out of the base instead.
            self._base = self._peft.unload()
            self._peft = None
            self._compiled = None

    def adapter_keys(self) -> frozenset[str]:
        return frozenset(self._keys)

    def score(self, rows: Sequence[EngineRow]) -> list[tuple[float, ...]]:
        if not rows:
            return []
        unknown = {row.adapter_key for row in rows if row.adapter_key is not None} - self._keys
        if unknown:
            raise KeyError(f"adapters not loaded: {sorted(unknown)}")
        prompts = [row.prompt_ids for row in rows]
        prefixes = [self._row_prefix(row) for row in rows]
        logits = self._logits(rows, prompts, prefixes)
        # Rows may belong to tasks with different label words: one softmax per label set.
        out: list[tuple[float, ...]] = [()] * len(rows)
        by_labels: dict[tuple[int, ...], list[int]] = {}
        for i, row in enumerate(rows):
            by_labels.setdefault(row.label_ids, []).append(i)
        for label_ids, indices in by_labels.items():
            probabilities = label_probabilities(logits[indices], label_ids).cpu().tolist()
            for i, values in zip(indices, probabilities, strict=True):
                out[i] = tuple(values)
        return out

    def _logits(
        self,
        rows: Sequence[EngineRow],
        prompts: Sequence[Sequence[int]],
        prefixes: Sequence[PromptPrefix | None],
    ) -> torch.Tensor:
        """Last-position logits of `rows`; PEFT's per-row routing only for mixed batches.

        Routing by `adapter_names` gathers and scatters the rows in every LoRA layer; a batch
        of one adapter runs it as the active one instead (+7-28% req/s at 1-8 callers here),
        compiled when the engine compiles.
        """
        model, names, routing = self._base, None, nullcontext()
        if self._peft is not None:
            model = self._peft
            keys = {row.adapter_key or BASE for row in rows}
            if len(keys) > 1:
                names = [row.adapter_key or BASE for row in rows]
            elif BASE in keys:
                routing = self._peft.disable_adapter()
            else:
                self._peft.set_adapter(keys.pop())
                if self._compiled is not None:
                    model = self._compiled
        with routing:
            return last_position_logits(
                model, prompts, self._pad_id, prefixes=prefixes, adapter_names=names
            )

    def _row_prefix(self, row: EngineRow) -> PromptPrefix | None:
        for ids in self._prefix_ids:
            if continues(row.prompt_ids, ids):
                return self._prefix(row.adapter_key or BASE, ids)
        return None

    def _prefix(self, key: str, ids: tuple[int, ...]) -> PromptPrefix:
        """The states of `ids` under adapter `key` (BASE: the base model), encoded once."""
        found = self._prefixes.get((key, ids))
        if found is None:
            if self._peft is None:
                found = encode_prefix(self._base, ids)
            else:
                found = encode_prefix(self._peft, ids, adapter_name=key)
            self._prefixes[(key, ids)] = found
        return found

    def close(self) -> None:
        self._peft = None
        self._compiled = None
        self._base = None
        self._keys.clear()
        self._prefixes.clear()
