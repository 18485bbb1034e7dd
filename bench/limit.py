"""The physical limit: this machine's dense matmul rate over the FLOPs of one scoring pass.

A scoring pass (`phishgate.core.scoring`) is one forward over the prompt with logits for
the last position only. Its FLOPs, counting a multiply-add as 2:

- every linear layer of every block, once per token: 2 * non-embedding params * tokens;
- attention scores and the weighted sum of values, causal (query i sees i+1 keys):
  2 * 2 * heads * head_dim * (1 + 2 + ... + n) per layer = 2 * heads * head_dim * n(n+1);
- the LM head, once per email (logits_to_keep=1): 2 * hidden * vocab.

The first `prefix` tokens of every prompt (the task's chat template and system prompt) are
the same for every email; the service computes their states once per adapter
(`phishgate.core.scoring.encode_prefix`), so a pass runs the linear layers on the other
tokens only, whose queries still attend to the prefix's keys. The limit is counted that
way, and also for a pass over every token (`whole_prompt_emails_per_s`).

Norms, rotary embeddings, activations and softmax are left out (a few percent, not
matmuls). The best possible emails/s is the measured matmul rate over the mean FLOPs per
email at the rendered lengths of real messages; no engine can beat it in that dtype.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phishgate.core.errors import ConfigError


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of a Llama-style decoder's config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From a Hugging Face config (dict); ConfigError if a needed key is missing."""
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            return cls(
                hidden=hidden,
                intermediate=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab=int(config["vocab_size"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"model config lacks what the FLOP count needs: {exc}") from None

    @classmethod
    def from_checkpoint(cls, path: Path) -> ModelShape:
        try:
            return cls.from_config(json.loads((path / "config.json").read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path / 'config.json'}: {exc}") from None


def block_params(shape: ModelShape) -> int:
    """Weights of the linear layers of all blocks (q, k, v, o, gate, up, down); no biases."""
    q_o = 2 * shape.hidden * shape.heads * shape.head_dim
    k_v = 2 * shape.hidden * shape.kv_heads * shape.head_dim
    mlp = 3 * shape.hidden * shape.intermediate
    return shape.layers * (q_o + k_v + mlp)


def scoring_flops(shape: ModelShape, n_tokens: int, prefix_tokens: int = 0) -> int:
    """FLOPs of one scoring pass over a prompt of `n_tokens` whose first `prefix_tokens`
    were computed beforehand (see the module docstring)."""
    if not 0 <= prefix_tokens < n_tokens:
        raise ValueError(f"need 0 <= prefix_tokens < n_tokens, got {prefix_tokens}, {n_tokens}")
    linear = 2 * block_params(shape) * (n_tokens - prefix_tokens)
    # Queries prefix..n-1, query i seeing i+1 keys: n(n+1)/2 - p(p+1)/2 dot products.
    pairs = n_tokens * (n_tokens + 1) - prefix_tokens * (prefix_tokens + 1)
    attention = shape.layers * 2 * shape.heads * shape.head_dim * pairs
    lm_head = 2 * shape.hidden * shape.vocab
    return linear + attention + lm_head


@dataclass(frozen=True)
class MatmulRate:
    """Best dense matmul rate measured: FLOP/s for square `size` matrices of `dtype`."""

    flops_per_s: float
    size: int
    dtype: str
    threads: int
    repeats: int


def measure_matmul_rate(
    size: int = 2048, repeats: int = 10, dtype: str = "float32", threads: int = 0
) -> MatmulRate:
    """Time `repeats` square matmuls after a warm-up; the best one gives the rate.

    `threads` > 0 sets torch's intra-op threads first (as the service does with
    PHISHGATE_TORCH_THREADS); 0 keeps torch's default.
    """
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ConfigError(f"unknown torch dtype {dtype!r}")
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(torch_dtype)
    b = torch.randn(size, size, generator=generator).to(torch_dtype)
    with torch.inference_mode():
        for _ in range(2):
            torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - started)
    return MatmulRate(2 * size**3 / best, size, dtype, torch.get_num_threads(), repeats)


@dataclass(frozen=True)
class Limit:
    """The best possible scoring throughput at that matmul rate, for those token lengths."""

    matmul: MatmulRate
    emails: int
    mean_tokens: float
    mean_flops_per_email: float
    flops_per_token: float
    emails_per_s: float
    tokens_per_s: float
    prefix_tokens: int = 0
    whole_prompt_emails_per_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "matmul": vars(self.matmul),
            "emails": self.emails,
            "mean_tokens": self.mean_tokens,
            "mean_flops_per_email": self.mean_flops_per_email,
            "flops_per_token": self.flops_per_token,
            "emails_per_s": self.emails_per_s,
            "tokens_per_s": self.tokens_per_s,
            "prefix_tokens": self.prefix_tokens,
            "whole_prompt_emails_per_s": self.whole_prompt_emails_per_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limit:
        return cls(
            matmul=MatmulRate(**data["matmul"]),
            emails=int(data["emails"]),
            mean_tokens=float(data["mean_tokens"]),
            mean_flops_per_email=float(data["mean_flops_per_email"]),
            flops_per_token=float(data["flops_per_token"]),
            emails_per_s=float(data["emails_per_s"]),
            tokens_per_s=float(data["tokens_per_s"]),
            prefix_tokens=int(data.get("prefix_tokens", 0)),
            whole_prompt_emails_per_s=float(
                data.get("whole_prompt_emails_per_s", data["emails_per_s"])
            ),
        )


def physical_limit(
    rate: MatmulRate, shape: ModelShape, token_lengths: Sequence[int], prefix_tokens: int = 0
) -> Limit:
    """Emails/s and tokens/s (prompt tokens, prefix included) if every FLOP of every scoring
    pass ran at `rate`, the shared `prefix_tokens` computed once."""
    if not token_lengths:
        raise ValueError("no token lengths")
    mean_flops = statistics.fmean(scoring_flops(shape, n, prefix_tokens) for n in token_lengths)
    whole_flops = statistics.fmean(scoring_flops(shape, n) for n in token_lengths)
    mean_tokens = statistics.fmean(token_lengths)
    emails_per_s = rate.flops_per_s / mean_flops
    return Limit(
        matmul=rate,
        emails=len(token_lengths),
        mean_tokens=mean_tokens,
        mean_flops_per_email=mean_flops,
        flops_per_token=mean_flops / mean_tokens,
        emails_per_s=emails_per_s,
        tokens_per_s=emails_per_s * mean_tokens,
        prefix_tokens=prefix_tokens,
        whole_prompt_emails_per_s=rate.flops_per_s / whole_flops,
    )
