"""Shared fixtures: the real base model, prepared once into the project's state folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from phishgate.core.settings import CoreSettings

# Tests compare engines and scorers to 1e-4; "auto" would pick bfloat16 on CPUs with AMX
# (test_scoring checks bfloat16 against float32 on its own). Servers started as
# subprocesses inherit it.
os.environ.setdefault("PHISHGATE_INFERENCE_DTYPE", "float32")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def core_settings() -> CoreSettings:
    return CoreSettings(home=REPO_ROOT / "var")


@pytest.fixture(scope="session")
def prepared_model(core_settings: CoreSettings) -> Any:
    """The SmolLM2-135M-Instruct checkpoint in the local cache (prepared on first use)."""
    from phishgate.core.model import prepare_base_model

    return prepare_base_model(core_settings)


@pytest.fixture(scope="session")
def tokenizer(prepared_model: Any) -> Any:
    from phishgate.core.model import load_tokenizer

    return load_tokenizer(prepared_model.path)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"labelled corpora not found at {SHARED_DATA}")
    return SHARED_DATA


PHISHING_TEMPLATES = [
    (
        "PayPal Service <service@paypa1-secure{n}.example>",
        "Your account is limited",
        "Dear customer, we noticed unusual activity. Verify your identity within 24 hours at "
        "https://paypa1-secure{n}.example/login?id={n} or your account will be suspended.",
    ),
    (
        "IT Helpdesk <helpdesk@mail-quota{n}.example>",
        "Mailbox quota exceeded",
        "Your mailbox is full. Click https://mail-quota{n}.example/upgrade to keep receiving "
        "mail and re-enter your password to confirm.",
    ),
]
LEGITIMATE_TEMPLATES = [
    (
        "Alice Martin <alice@university{n}.example>",
        "Minutes of Tuesday's seminar",
        "Hi all, attached are the minutes of the seminar number {n}. The next meeting is on "
        "Thursday in room 204; please send agenda items by Wednesday.",
    ),
    (
        "R-help digest <r-help@lists{n}.example>",
        "Re: lm() with factor interactions",
        "You can use lm(y ~ a * b, data = d) and then anova() to compare the models; see "
        "chapter {n} of the manual for the details.",
    ),
]


def synthetic_email(sender: str, subject: str, body: str) -> bytes:
    """A small RFC 822 message; the test corpus is made here, never copied from shared/."""
    return (
        f"From: {sender}\r\nTo: someone@example.org\r\nSubject: {subject}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """train/dev/test.jsonl for the phishing task, rendered by the real renderer."""
    import json

    from phishgate.core.render import render_email, training_example
    from phishgate.core.tasks import get_task

    task = get_task("phishing")
    folder = tmp_path_factory.mktemp("tiny-data")
    sizes = {"train": 12, "dev": 6, "test": 6}
    n = 0
    for split, count in sizes.items():
        rows = []
        for i in range(count):
            n += 1
            label, templates = (
                ("phishing", PHISHING_TEMPLATES) if i % 2 else ("legitimate", LEGITIMATE_TEMPLATES)
            )
            sender, subject, body = (part.format(n=n) for part in templates[n % 2])
            rendered = render_email(synthetic_email(sender, subject, body), task, tokenizer, 256)
            row = {
                "id": f"synthetic:{n}",
                "source": "synthetic",
                "label": label,
                "n_tokens": rendered.n_tokens,
                "lang": "en",
            }
            rows.append({**row, **training_example(rendered, label, task)})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="session")
def trained_adapters(
    tmp_path_factory: pytest.TempPathFactory, prepared_model: Any, tiny_dataset: Path
) -> tuple[Path, Path]:
    """Two real LoRA adapters for the phishing task, each with its self-description.

    A few AdamW steps with PEFT on the tiny dataset's train split (answer tokens only, no
    Ray): the first folder after 2 steps, the second after 4, so they score differently.
    """
    import json

    import torch
    from peft import LoraConfig, get_peft_model

    from phishgate.core.adapters import AdapterManifest, write_manifest
    from phishgate.core.model import load_causal_lm, load_tokenizer
    from phishgate.core.tasks import PROMPT_VERSION, get_task

    torch.manual_seed(0)
    tokenizer = load_tokenizer(prepared_model.path)
    model = load_causal_lm(prepared_model.path)
    layers = model.config.num_hidden_layers
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    peft_model = get_peft_model(
        model,
        LoraConfig(
            **lora,
            lora_dropout=0.0,
            layers_to_transform=[layers - 2, layers - 1],
            task_type="CAUSAL_LM",
        ),
    )
    examples = []
    for line in (tiny_dataset / "train.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        template = {"tokenize": True, "return_dict": False}
        prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, **template)
        full = tokenizer.apply_chat_template(messages, **template)
        examples.append((list(full), [-100] * len(prompt) + list(full[len(prompt) :])))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    pad = tokenizer.pad_token_id or 0
    task = get_task("phishing")
    folders = []
    peft_model.train()
    for step in range(4):
        batch = [examples[(step * 4 + i) % len(examples)] for i in range(4)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = peft_model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (1, 3):
            folder = tmp_path_factory.mktemp(f"adapter-step{step + 1}")
            peft_model.save_pretrained(folder)
            manifest = AdapterManifest(
                task=task.name,
                labels=task.labels,
                threshold=0.5,
                prompt_version=PROMPT_VERSION,
                max_input_tokens=256,
                base_model_id=prepared_model.model_id,
                base_weights_hash=prepared_model.weights_hash,
                metrics={"train_loss": float(loss.item()), "steps": float(step + 1)},
                lora=lora,
            )
            write_manifest(folder, manifest)
            folders.append(folder)
    return folders[0], folders[1]


@pytest.fixture(scope="session")
def trained_adapter(trained_adapters: tuple[Path, Path]) -> Path:
    """A real LoRA adapter folder (PEFT files + phishgate-adapter.json) for phishing."""
    return trained_adapters[0]


def make_adapter_registry(
    home: Path, prepared_model: Any, folders: tuple[Path, ...]
) -> tuple[CoreSettings, Any]:
    """A state folder `home` whose SQLite MLflow registry holds phishgate-phishing versions
    1, 2... (the `folders`), @champion on 1 and @challenger on 2; the base model cache is
    linked in, not copied. Returns (core settings, MlflowClient)."""
    from phishgate.core.adapters import read_manifest
    from phishgate.core.registry import experiment_id, mlflow_client, register_adapter

    home.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(prepared_model.path.parent, target_is_directory=True)
    settings = CoreSettings(home=home, mlflow_tracking_uri="", max_input_tokens=256)
    client = mlflow_client(settings)
    experiment = experiment_id(client, settings)
    for i, folder in enumerate(folders):
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(folder), "adapter")
        client.set_terminated(run.info.run_id)
        register_adapter(
            client,
            task="phishing",
            run_id=run.info.run_id,
            artifact_uri=f"{run.info.artifact_uri}/adapter",
            manifest=read_manifest(folder),
            alias=("champion", "challenger")[min(i, 1)],
        )
    return settings, client


@pytest.fixture
def registered_adapters(
    tmp_path: Path, prepared_model: Any, trained_adapters: tuple[Path, Path]
) -> tuple[CoreSettings, Any]:
    """`make_adapter_registry` in a fresh home: the two trained adapters as versions 1, 2."""
    return make_adapter_registry(tmp_path / "home", prepared_model, trained_adapters)
