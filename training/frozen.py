"""The frozen lower layers of a LoRA fine-tune, run once per example instead of every step.

With LoRA on the top N decoder layers only (`lora.top_layers`), the layers below carry no
trainable weight: what they output for an example is the same in every step of every
epoch. `FrozenLowerLayers.encode` runs them once over the training set and keeps their
output (the hidden states entering the first trained layer); training then runs the upper
layers alone on those states (`upper_only`), which is the same computation as the whole
model minus the repeated part.

It needs a decoder with `embed_tokens`, `layers` and `norm` (Llama, Mistral, Qwen2 and
SmolLM2 have them) whose forward accepts `inputs_embeds`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from phishgate.core.scoring import left_pad


def decoder_of(model: Any) -> Any:
    """The decoder stack of a causal LM or of a PEFT wrapper around one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None)
    for part in ("embed_tokens", "layers", "norm"):
        if not hasattr(decoder, part):
            raise ValueError(
                f"{type(base).__name__} has no decoder with {part!r}: cannot cache its frozen "
                "layers (set cache_frozen_layers: false)"
            )
    return decoder


class FrozenLowerLayers:
    """The first `n_frozen` decoder layers of `model` (embeddings included)."""

    def __init__(self, model: Any, n_frozen: int) -> None:
        self._decoder = decoder_of(model)
        layers = self._decoder.layers
        if not 0 < n_frozen < len(layers):
            raise ValueError(f"n_frozen must be in 1..{len(layers) - 1}, got {n_frozen}")
        self.n_frozen = n_frozen
        self._lower = torch.nn.ModuleList(layers[:n_frozen])
        self._upper = torch.nn.ModuleList(layers[n_frozen:])

    def encode(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        pad_id: int,
        batch_size: int = 8,
        progress: Callable[[int], None] | None = None,
    ) -> list[torch.Tensor]:
        """The hidden states entering layer `n_frozen`: one [len, hidden] tensor per sequence,
        unpadded, on the CPU, in the model's dtype; views into one buffer (one allocation
        for the whole set, not one per example).

        Sequences are run in length-sorted, left-padded batches with real-token positions,
        so each one gets the states it would get alone.
        """
        embed = self._decoder.embed_tokens.weight
        starts = [0]
        for sequence in sequences:
            starts.append(starts[-1] + len(sequence))
        buffer = torch.empty((starts[-1], embed.shape[1]), dtype=embed.dtype)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        device = embed.device
        with torch.no_grad(), self._swapped(layers=self._lower, norm=torch.nn.Identity()):
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                input_ids, attention_mask, position_ids = left_pad(
                    [sequences[i] for i in chunk], pad_id
                )
                hidden = self._decoder(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    position_ids=position_ids.to(device),
                    use_cache=False,
                ).last_hidden_state
                width = hidden.shape[1]
                for row, i in enumerate(chunk):
                    buffer[starts[i] : starts[i + 1]] = hidden[row, width - len(sequences[i]) :]
                if progress:
                    progress(len(chunk))
        return [buffer[starts[i] : starts[i + 1]] for i in range(len(sequences))]

    @contextlib.contextmanager
    def upper_only(self) -> Iterator[None]:
        """Within: the model runs layers `n_frozen`.. only, on `inputs_embeds` = `encode`'s
        states. Parameter names (and so saved adapters) are unchanged outside."""
        with self._swapped(layers=self._upper):
            yield

    @contextlib.contextmanager
    def _swapped(self, **parts: torch.nn.Module) -> Iterator[None]:
        saved = {name: getattr(self._decoder, name) for name in parts}
        try:
            for name, module in parts.items():
                setattr(self._decoder, name, module)
            yield
        finally:
            for name, module in saved.items():
                setattr(self._decoder, name, module)


def pad_states(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Left-pad [len, hidden] tensors with zeros into [batch, width, hidden]: the layout of
    `phishgate.core.scoring.left_pad`, whose attention mask hides the padding."""
    width = max(s.shape[0] for s in states)
    batch = states[0].new_zeros((len(states), width, states[0].shape[1]))
    for row, s in enumerate(states):
        batch[row, width - s.shape[0] :] = s
    return batch
