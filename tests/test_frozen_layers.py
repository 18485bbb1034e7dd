"""The frozen-lower-layers cache computes what the whole model computes (real 135M model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from phishgate.training.frozen import FrozenLowerLayers, decoder_of, pad_states

TOP = 2


@pytest.fixture(scope="module")
def lora_model(prepared_model: Any) -> Any:
    """float32 base + LoRA on the top 2 layers, lora_B randomised so the adapter matters."""
    from peft import LoraConfig, get_peft_model

    from phishgate.core.model import load_causal_lm

    model = load_causal_lm(prepared_model.path, torch.float32)
    n = int(model.config.num_hidden_layers)
    peft = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            layers_to_transform=list(range(n - TOP, n)),
            task_type="CAUSAL_LM",
        ),
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft.train()
    return peft


@pytest.fixture(scope="module")
def features(tiny_dataset: Path, tokenizer: Any) -> list[dict[str, list[int]]]:
    from phishgate.training.evaluate import load_examples
    from phishgate.training.sft import featurize

    examples = load_examples(tiny_dataset / "train.jsonl")[:3]
    rows = [featurize(tokenizer, e) for e in examples]
    rows[1] = {k: v[5:] for k, v in rows[1].items()}  # a shorter one: the batch needs padding
    assert len({len(r["input_ids"]) for r in rows}) > 1
    return rows


def _loss_and_grads(
    model: Any, batch: dict[str, torch.Tensor], frozen: FrozenLowerLayers | None
) -> tuple[float, dict[str, torch.Tensor]]:
    from phishgate.training.sft import answer_loss

    model.zero_grad()
    loss = answer_loss(model, batch, frozen)
    loss.backward()
    grads = {
        name: param.grad.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad and param.grad is not None
    }
    return float(loss.detach()), grads


def test_cached_lower_layers_give_the_whole_models_loss_and_gradients(
    lora_model: Any, features: list[dict[str, list[int]]], tokenizer: Any
) -> None:
    from phishgate.training.sft import LeftPadCollator

    n = int(lora_model.config.num_hidden_layers)
    frozen = FrozenLowerLayers(lora_model, n - TOP)
    pad_id = tokenizer.pad_token_id or 0
    states = frozen.encode([f["input_ids"] for f in features], pad_id=pad_id, batch_size=2)
    rows = [{**f, "index": i} for i, f in enumerate(features)]

    whole_loss, whole_grads = _loss_and_grads(lora_model, LeftPadCollator(pad_id)(rows), None)
    cached_batch = LeftPadCollator(pad_id, states)(rows)
    assert cached_batch["inputs_embeds"].shape[:2] == cached_batch["input_ids"].shape
    cached_loss, cached_grads = _loss_and_grads(lora_model, cached_batch, frozen)

    assert cached_loss == pytest.approx(whole_loss, rel=1e-5)
    assert whole_grads and set(cached_grads) == set(whole_grads)
    assert all(".layers.28." in k or ".layers.29." in k for k in whole_grads)
    for name, grad in whole_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-3, atol=1e-6)


def test_encode_gives_each_sequence_its_own_states_whatever_the_batch(
    lora_model: Any, features: list[dict[str, list[int]]], tokenizer: Any
) -> None:
    n = int(lora_model.config.num_hidden_layers)
    frozen = FrozenLowerLayers(lora_model, n - TOP)
    sequences = [f["input_ids"] for f in features]
    pad_id = tokenizer.pad_token_id or 0
    batched = frozen.encode(sequences, pad_id=pad_id, batch_size=8)
    alone = frozen.encode(sequences, pad_id=pad_id, batch_size=1)
    for sequence, a, b in zip(sequences, batched, alone, strict=True):
        assert a.shape == (len(sequence), lora_model.config.hidden_size)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    padded = pad_states(batched)
    assert padded.shape[1] == max(len(s) for s in sequences)
    short = min(range(len(sequences)), key=lambda i: len(sequences[i]))
    assert padded[short, : padded.shape[1] - len(sequences[short])].abs().sum() == 0


def test_upper_only_restores_the_model_even_on_error(lora_model: Any) -> None:
    n = int(lora_model.config.num_hidden_layers)
    names = [name for name, _ in lora_model.named_parameters()]
    frozen = FrozenLowerLayers(lora_model, n - TOP)
    with pytest.raises(RuntimeError, match="inside"), frozen.upper_only():
        assert len(decoder_of(lora_model).layers) == TOP
        raise RuntimeError("inside")
    assert len(decoder_of(lora_model).layers) == n
    assert [name for name, _ in lora_model.named_parameters()] == names


def test_models_without_a_decoder_stack_and_bad_splits_are_refused(lora_model: Any) -> None:
    with pytest.raises(ValueError, match="cache_frozen_layers: false"):
        decoder_of(torch.nn.Linear(2, 2))
    n = int(lora_model.config.num_hidden_layers)
    for bad in (0, n):
        with pytest.raises(ValueError, match="n_frozen must be in"):
            FrozenLowerLayers(lora_model, bad)
