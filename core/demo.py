"""`phishgate demo`: the whole gateway on one machine, from labelled mail to a verdict.

Stages, each timed and each reusing what an earlier run left in the home folder:
base model -> data -> training (Ray Train, registered as @challenger) -> promotion gate
(@champion) -> eval against the zero-shot base model on the test split -> mail flow
(the classifier serving @champion, the milter sidecar, a private Postfix; held-out test
messages sent over SMTP) -> summary. Every process started is stopped on the way out,
also on Ctrl-C or failure.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from phishgate.core.errors import ConfigError
from phishgate.core.registry import CHAMPION, model_name
from phishgate.core.tasks import PROMPT_VERSION

if TYPE_CHECKING:
    from phishgate.core.demo_mail import MailOutcome
    from phishgate.core.settings import CoreSettings

Say = Callable[[str], None]
TASK = "phishing"


@dataclass(frozen=True)
class StageTime:
    name: str
    seconds: float
    note: str


@dataclass
class DemoResult:
    """What the summary shows; filled stage by stage."""

    stages: list[StageTime] = field(default_factory=list)
    data_dir: Path | None = None
    champion: str | None = None
    promotion: str = ""
    eval_dir: Path | None = None
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    mail: list[MailOutcome] = field(default_factory=list)


class Stages:
    """Times named stages and records them on `result`."""

    def __init__(self, result: DemoResult, say: Say) -> None:
        self.result = result
        self.say = say

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[list[str]]:
        """Yields a list the stage appends its one-line note to."""
        self.say(f"== {name}")
        note: list[str] = []
        started = time.perf_counter()
        yield note
        seconds = time.perf_counter() - started
        self.result.stages.append(StageTime(name, seconds, "; ".join(note)))
        self.say(f"   {name}: {seconds:.1f} s{' (' + '; '.join(note) + ')' if note else ''}")


def run_demo(
    settings: CoreSettings,
    *,
    train_config: Path,
    data_config: Path | None,
    eval_limit: int,
    messages: int,
    say: Say,
) -> DemoResult:
    """Run every stage; ConfigError (or the stage's own error) stops the demo."""
    result = DemoResult()
    stages = Stages(result, say)
    with stages.stage("base model") as note:
        from phishgate.core.model import prepare_base_model

        prepared = prepare_base_model(settings)
        note.append(prepared.short_id)
    with stages.stage("data") as note:
        result.data_dir = prepare_data(settings, data_config, note)
    with stages.stage("training") as note:
        version = train_adapter(settings, train_config, result.data_dir, note, say)
    with stages.stage("promotion") as note:
        result.champion, result.promotion = promote_champion(
            settings, version, result.data_dir, eval_limit
        )
        note.append(result.promotion)
    with stages.stage("evaluation") as note:
        result.eval_dir, result.metrics = evaluate_champion(
            settings, result.data_dir, result.champion, eval_limit, note
        )
    with stages.stage("mail flow") as note:
        from phishgate.core.demo_mail import run_mail_flow

        threshold = _threshold(settings, result.champion)
        result.mail = run_mail_flow(settings, result.data_dir, messages, threshold, say)
        finals = [outcome.final for outcome in result.mail]
        note.append(", ".join(f"{finals.count(f)} {f}" for f in sorted(set(finals))))
    return result


def prepare_data(settings: CoreSettings, data_config: Path | None, note: list[str]) -> Path:
    """The demo's phishing dataset at the settings' token budget, made unless it exists.

    It has its own folder (`<home>/data/demo-phishing-<budget>`) so the demo's shorter
    budget never replaces a dataset prepared by `phishgate data prepare`.
    """
    from phishgate.core.model import load_tokenizer, resolve_base_model
    from phishgate.training.data import prepare_dataset
    from phishgate.training.sources import DEFAULT_CONFIG, load_data_config

    out_dir = settings.dataset_dir(f"demo-{TASK}-{settings.max_input_tokens}")
    card = out_dir / "card.json"
    reusable = data_config is None and card.is_file()
    if reusable and json.loads(card.read_text()).get("prompt_version") == PROMPT_VERSION:
        note.append(f"reused {out_dir}")
        return out_dir
    config = load_data_config(data_config or DEFAULT_CONFIG, task=TASK)
    tokenizer = load_tokenizer(resolve_base_model(settings).path)
    prepared = prepare_dataset(config, settings, tokenizer, out_dir=out_dir)
    counts = {split: info["count"] for split, info in prepared.card["splits"].items()}
    note.append(", ".join(f"{split} {n}" for split, n in counts.items()))
    return prepared.out_dir


def train_adapter(
    settings: CoreSettings, config_path: Path, data_dir: Path, note: list[str], say: Say
) -> str:
    """The registered version trained on this data and prompt version, trained if none is."""
    from phishgate.core.errors import AdapterNotFound
    from phishgate.core.registry import list_versions, mlflow_client
    from phishgate.training.config import load_train_config
    from phishgate.training.job import data_hash, run_training
    from phishgate.training.ray_cluster import disconnect

    current = data_hash(data_dir)
    client = mlflow_client(settings)
    try:
        versions = list_versions(client, TASK)
    except AdapterNotFound:
        versions = []
    for info in versions:  # newest first; the champion wins over a newer challenger
        if CHAMPION in info.aliases and _same_data(info.tags, current):
            note.append(f"reused version {info.version} (@{CHAMPION})")
            return info.version
    for info in versions:
        if _same_data(info.tags, current):
            note.append(f"reused version {info.version}")
            return info.version
    config = load_train_config(config_path, [f"data_dir={data_dir}"])
    try:
        outcome = run_training(config, settings, say=say)
    finally:
        disconnect()  # the local Ray would otherwise hold memory and CPU through the demo
    if outcome.version is None:
        raise ConfigError(f"training config {config_path} does not register its adapter")
    note.append(f"version {outcome.version}, dev F1 {outcome.dev_metrics.get('dev_f1', 0):.3f}")
    return outcome.version


def _same_data(tags: dict[str, str], data_hash: str) -> bool:
    return tags.get("data_hash") == data_hash and tags.get("prompt_version") == PROMPT_VERSION


def promote_champion(
    settings: CoreSettings, version: str, data_dir: Path, limit: int
) -> tuple[str, str]:
    """(champion version, what happened): the promotion gate unless `version` already is it."""
    from phishgate.core.registry import CHALLENGER, mlflow_client
    from phishgate.training.promotion import promote

    client = mlflow_client(settings)
    name = model_name(TASK)
    aliases = client.get_registered_model(name).aliases or {}
    if str(aliases.get(CHAMPION)) == version:
        return version, f"version {version} already @{CHAMPION}"
    if str(aliases.get(CHALLENGER)) != version:
        client.set_registered_model_alias(name, CHALLENGER, version)
    report = promote(settings, TASK, data_dir=data_dir, limit=limit)
    reasons = "; ".join(report.decision.reasons)
    if report.decision.promote:
        return version, f"version {version} promoted: {reasons}"
    champion = report.champion_version
    if champion is None:
        raise ConfigError(f"the promotion gate refused version {version} and there is no champion")
    return champion, f"version {version} refused ({reasons}); serving version {champion}"


def _threshold(settings: CoreSettings, version: str) -> float:
    """The decision threshold registered with `version` (chosen on dev at training time)."""
    from phishgate.core.registry import mlflow_client

    tags = mlflow_client(settings).get_model_version(model_name(TASK), version).tags or {}
    return float(tags.get("threshold", 0.5))


def evaluate_champion(
    settings: CoreSettings, data_dir: Path, version: str, limit: int, note: list[str]
) -> tuple[Path, dict[str, dict[str, float | None]]]:
    """Test-split metrics of the champion and of the zero-shot base model (cached per version)."""
    from phishgate.training.eval_run import run_eval

    out_dir = settings.home / "reports" / f"demo-eval-v{version}-n{limit}"
    summary_file = out_dir / "summary.json"
    if summary_file.is_file():
        note.append(f"reused {out_dir}")
        summary = json.loads(summary_file.read_text())
    else:
        summary = run_eval(
            settings,
            TASK,
            data_dir=data_dir,
            out_dir=out_dir,
            splits=("test",),
            predictors=("zero-shot", "adapter"),
            adapter=f"models:/{model_name(TASK)}@{CHAMPION}",
            limit=limit,
            robustness=False,
        ).to_dict()
    metrics = {
        row["predictor"]: {
            k: row["metrics"].get(k) for k in ("f1", "precision", "recall", "roc_auc")
        }
        for row in summary["results"]
        if row["split"] == "test"
    }
    return out_dir, metrics
