"""Bad training configs fail before any work, naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phishgate.core.errors import ConfigError
from phishgate.core.settings import CoreSettings
from phishgate.training.config import load_train_config
from phishgate.training.job import check_before_work

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name: str) -> None:
    config = load_train_config(CONFIGS / name)
    assert config.name == Path(name).stem


def test_overrides_apply_with_yaml_types(tmp_path: Path) -> None:
    config = load_train_config(
        _write(tmp_path, "epochs: 1\nlora: {r: 4}\n"),
        ["epochs=3", "lora.r=16", "lora.target_modules=[q_proj, v_proj]", "learning_rate=1e-4"],
    )
    assert config.epochs == 3 and config.lora.r == 16 and config.learning_rate == 1e-4
    assert config.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("text", "overrides", "field"),
    [
        ("epochs: 1\nwarmup: 3\n", [], "warmup"),
        ("lora: {r: 0}\n", [], "lora.r"),
        ("lora: {rank: 8}\n", [], "lora.rank"),
        ("task: malware\n", [], "task"),
        ("epochs: 1\n", ["epochs"], "key=value"),
        ("epochs: 1\n", ["batch_size=-2"], "batch_size"),
        ("epochs: 1\n", ["dtype=float16"], "dtype"),
        ("epochs: 1\n", ["cpus_per_worker=0"], "cpus_per_worker"),
        ("- a list\n", [], "mapping"),
        ("epochs: [\n", [], "not valid YAML"),
    ],
)
def test_bad_configs_name_the_field(
    tmp_path: Path, text: str, overrides: list[str], field: str
) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_train_config(_write(tmp_path, text), overrides)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read training config"):
        load_train_config(tmp_path / "nope.yaml")


def _split(path: Path, labels: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": str(i), "source": "s", "label": label, "messages": []}
        for i, label in enumerate(labels)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_data_problems_are_found_before_training(tmp_path: Path) -> None:
    settings = CoreSettings(home=tmp_path / "home")
    config = load_train_config(None, [f"data_dir={tmp_path / 'data'}"])
    with pytest.raises(ConfigError, match=r"data_dir: .* has no train\.jsonl"):
        check_before_work(config, settings)
    _split(tmp_path / "data" / "train.jsonl", ["legitimate", "spam"])
    _split(tmp_path / "data" / "dev.jsonl", ["legitimate", "spam"])
    with pytest.raises(
        ConfigError, match=r"task: the train split has labels \['legitimate', 'spam'\]"
    ):
        check_before_work(config, settings)


def test_four_bit_without_cuda_is_refused(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: 4-bit is allowed here")
    config = load_train_config(None, ["quantize_4bit=true"])
    with pytest.raises(ConfigError, match="quantize_4bit: CUDA is not available"):
        check_before_work(config, CoreSettings(home=tmp_path))


def test_training_without_ray_runs_one_worker(tmp_path: Path) -> None:
    from phishgate.training.job import run_training

    config = load_train_config(None, ["num_workers=2"])
    with pytest.raises(ConfigError, match="num_workers: training without Ray runs exactly one"):
        run_training(config, CoreSettings(home=tmp_path), use_ray=False)


def test_data_rendered_by_another_prompt_version_is_refused_and_the_budget_is_the_cards(
    tmp_path: Path,
) -> None:
    from phishgate.training.job import data_budget

    settings = CoreSettings(home=tmp_path / "home", max_input_tokens=512)
    data = tmp_path / "data"
    _split(data / "train.jsonl", ["legitimate", "phishing"])
    _split(data / "dev.jsonl", ["legitimate", "phishing"])
    assert data_budget(data, settings) == 512  # no card: the settings' budget
    card = {"prompt_version": "pg-prompt-0", "max_input_tokens": 256}
    (data / "card.json").write_text(json.dumps(card))
    config = load_train_config(None, [f"data_dir={data}"])
    with pytest.raises(ConfigError, match="rendered with prompt 'pg-prompt-0'"):
        check_before_work(config, settings)
    assert data_budget(data, settings) == 256
