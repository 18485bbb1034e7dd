"""The `phishgate` command line: one typer app, one sub-app per area.

Sub-app names kept for later areas: data, eval, train, registry, serve, bench.

torch, transformers and the settings are imported inside the commands, so that
`phishgate --help` stays fast. Domain errors (PhishgateError) become a one-line message and
a sysexits(3) exit code in `_App.__call__`, the one place that maps them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from phishgate.core.errors import (
    AdapterMismatch,
    AdapterNotFound,
    ConfigError,
    EngineUnavailable,
    InvalidMessage,
    ModelNotPrepared,
    PhishgateError,
)

if TYPE_CHECKING:
    from phishgate.core.demo import DemoResult
    from phishgate.core.model import PreparedModel
    from phishgate.core.render import RenderedEmail
    from phishgate.core.settings import CoreSettings

# sysexits(3): EX_DATAERR, EX_NOINPUT, EX_UNAVAILABLE, EX_SOFTWARE, EX_CONFIG.
EX_DATAERR, EX_NOINPUT, EX_UNAVAILABLE, EX_SOFTWARE, EX_CONFIG = 65, 66, 69, 70, 78
_EXIT_CODES: dict[type[PhishgateError], int] = {
    InvalidMessage: EX_DATAERR,
    AdapterNotFound: EX_NOINPUT,
    ModelNotPrepared: EX_UNAVAILABLE,
    EngineUnavailable: EX_UNAVAILABLE,
    ConfigError: EX_CONFIG,
    AdapterMismatch: EX_CONFIG,
}


def exit_code(error: PhishgateError) -> int:
    """The process exit code for a domain error (1 when no closer code fits)."""
    for cls in type(error).__mro__:
        if cls in _EXIT_CODES:
            return _EXIT_CODES[cls]
    return 1


class _App(typer.Typer):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except PhishgateError as error:
            _error(str(error))
            raise SystemExit(exit_code(error)) from None


app = _App(
    name="phishgate",
    help="Email-security gateway that classifies mail with a small LLM fine-tuned by LoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
model_app = typer.Typer(
    help="The base model: prepare it once from the bundled GGUF, show what is prepared.",
    no_args_is_help=True,
)
app.add_typer(model_app, name="model")


@model_app.command("prepare")
def model_prepare() -> None:
    """Convert the base model into the local cache (or hash a checkpoint path). Idempotent."""
    settings = _settings()
    started = time.perf_counter()
    prepared, fresh = _prepare(settings)
    elapsed = time.perf_counter() - started
    out = Console()
    out.print("prepared" if fresh else "already prepared", style="bold green")
    grid = _grid(
        ("path", str(prepared.path)),
        ("model id", prepared.model_id),
        ("weights hash", prepared.weights_hash),
        ("time", f"{elapsed:.1f} s"),
    )
    out.print(grid)


@model_app.command("info")
def model_info() -> None:
    """Show the prepared base model's manifest; fails if it is not prepared."""
    from phishgate.core.model import base_model_manifest

    manifest = base_model_manifest(_settings())
    first = ("model_id", "path", "weights_hash", "dtype", "n_params")
    keys = [*first, *(key for key in manifest if key not in first and key != "fingerprint")]
    rows: list[tuple[str, str]] = []
    for key in keys:
        value = manifest.get(key)
        if isinstance(value, dict):
            rows.extend((f"{key}.{sub}", str(item)) for sub, item in value.items())
        else:
            rows.append((key, str(value)))
    Console().print(_grid(*rows))


@app.command()
def classify(
    files: Annotated[list[Path], typer.Argument(help="Email files: .eml or one message per file.")],
    task: Annotated[str, typer.Option(help="Classification task: phishing or spam.")] = "phishing",
    json_lines: Annotated[
        bool, typer.Option("--json", help="One JSON object per scored file on stdout.")
    ] = False,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            min=128,
            help="Token budget per email (default: the adapter's, else the setting).",
        ),
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option(help="LoRA adapter: a folder or models:/phishgate-<task>@<alias>."),
    ] = None,
) -> None:
    """Score emails with the base model (zero-shot) or base + a LoRA adapter.

    The base model is prepared first if needed. With an adapter, its own threshold and
    token budget apply. A file that cannot be read or is not an email gets a one-line
    error on stderr; the others are still scored, and the exit code is non-zero.
    """
    from phishgate.core.tasks import get_task

    settings = _settings()
    chosen = get_task(task)

    from phishgate.core.registry import load_scoring_model
    from phishgate.core.render import render_email
    from phishgate.core.scoring import TransformersScorer

    _prepare(settings)
    with _quiet_libraries():
        loaded = load_scoring_model(settings, adapter)
    manifest = loaded.adapter.manifest if loaded.adapter else None
    if manifest is not None and manifest.task != chosen.name:
        raise ConfigError(f"adapter {adapter} is for task {manifest.task!r}, not {chosen.name!r}")
    budget = max_tokens or (manifest.max_input_tokens if manifest else settings.max_input_tokens)
    threshold = manifest.threshold if manifest else 0.5
    tokenizer = loaded.tokenizer
    scorer = TransformersScorer(loaded.model, tokenizer, chosen)

    failure = 0
    paths: list[Path] = []
    rendered: list[RenderedEmail] = []
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            _error(f"{path}: cannot read: {exc.strerror or exc}")
            failure = failure or EX_NOINPUT
            continue
        try:
            rendered.append(render_email(raw, chosen, tokenizer, budget))
        except InvalidMessage as exc:
            _error(f"{path}: not a usable email: {exc}")
            failure = failure or EX_DATAERR
            continue
        paths.append(path)

    scores = scorer.score_batch(rendered, threshold) if rendered else []
    if json_lines:
        for path, score in zip(paths, scores, strict=True):
            record = {
                "file": str(path),
                "task": chosen.name,
                "model": loaded.base_short_id,
                "adapter": loaded.name if loaded.adapter else None,
            }
            typer.echo(json.dumps({**record, **dataclasses.asdict(score)}))
    elif scores:
        table = Table(title=f"{chosen.name} · {loaded.name} · threshold {threshold:.3f}")
        table.add_column("file", overflow="fold")
        for column in ("label", f"P({chosen.positive_label})", "tokens", "truncated"):
            table.add_column(column, no_wrap=True)
        for path, score in zip(paths, scores, strict=True):
            table.add_row(
                escape(str(path)),
                score.label,
                f"{score.score:.4f}",
                str(score.n_tokens),
                "yes" if score.truncated else "no",
            )
        Console().print(table)
    if failure:
        raise typer.Exit(failure)


@app.command()
def train(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Training YAML, e.g. training/configs/demo.yaml."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: --set epochs=2 --set lora.r=16."),
    ] = None,
    no_ray: Annotated[
        bool,
        typer.Option(
            "--no-ray",
            help="Run the same training loop in this process, without Ray (one worker): "
            "for debugging, and to measure what Ray costs.",
        ),
    ] = False,
) -> None:
    """Train a LoRA adapter with Ray Train, track it in MLflow, register it as challenger."""
    from phishgate.training.config import load_train_config
    from phishgate.training.job import run_training

    settings = _settings()
    job = load_train_config(config, overrides or [])
    out = Console()
    outcome = run_training(job, settings, say=out.print, use_ray=not no_ray)
    out.print(
        _grid(
            ("run", outcome.run_id),
            ("registered version", outcome.version or "not registered"),
            ("best epoch", str(outcome.best_epoch)),
            ("dev F1", f"{outcome.dev_metrics.get('dev_f1', float('nan')):.4f}"),
            ("threshold", f"{outcome.threshold:.4f}"),
            ("adapter", str(outcome.adapter_dir)),
            ("time", f"{outcome.seconds:.0f} s"),
        )
    )


_DataDir = Annotated[
    Path | None,
    typer.Option(help="Prepared dataset folder (default: <home>/data/<task>)."),
]

data_app = typer.Typer(
    help="Labelled mail: prepare leak-free train/dev/test splits, audit source shortcuts.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    config: Annotated[
        Path | None, typer.Option(help="Data config YAML (default: the shipped default.yaml).")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Task, overriding the config's.")] = None,
    source: Annotated[
        list[str] | None,
        typer.Option(help="Add or replace a source: NAME=PATH:LABEL[:FORMAT] (repeatable)."),
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="Folder the config's relative source paths start from.")
    ] = None,
    holdout: Annotated[
        list[str] | None,
        typer.Option(help="Source or corpus written only to holdout.jsonl (repeatable)."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the split.")] = None,
    max_per_source: Annotated[
        int | None, typer.Option(min=1, help="Read at most N messages per source.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: <home>/data/<task>).")
    ] = None,
) -> None:
    """Render labelled mail through the one renderer, dedupe, split by campaign, write a card."""
    from phishgate.core.model import load_tokenizer
    from phishgate.training.data import prepare_dataset
    from phishgate.training.sources import (
        DEFAULT_CONFIG,
        load_data_config,
        parse_source_override,
    )

    settings = _settings()
    data_config = load_data_config(
        config or DEFAULT_CONFIG,
        task=task,
        data_root=data_root,
        sources=[parse_source_override(spec) for spec in source or []],
        holdout_sources=holdout or None,
        seed=seed,
        max_per_source=max_per_source,
    )
    prepared, _ = _prepare(settings)
    with _quiet_libraries():
        tokenizer = load_tokenizer(prepared.path)
    result = prepare_dataset(data_config, settings, tokenizer, out_dir=out)
    card = result.card
    table = Table(title=f"{card['task']} · {card['prompt_version']} · {result.out_dir}")
    for column in ("split", "messages", *card["labels"], "tokens p95", "truncated", "sha256"):
        table.add_column(column)
    for split, info in card["splits"].items():
        table.add_row(
            split,
            str(info["count"]),
            *(str(info["labels"][label]) for label in card["labels"]),
            str(info["tokens"]["p95"]),
            f"{info['tokens']['truncated_fraction']:.1%}",
            info["sha256"][:12],
        )
    out_console = Console()
    out_console.print(table)
    totals, dupes = card["totals"], card["duplicates"]
    out_console.print(
        _grid(
            ("read", str(totals["read"])),
            ("skipped", str(totals["skipped"])),
            (
                "duplicates",
                f"{dupes['exact_raw'] + dupes['exact_text']} exact, {dupes['near_removed']} near",
            ),
            ("time", f"{card['timing']['total_s']} s"),
            ("card", str(result.out_dir / "card.md")),
        )
    )
    err = Console(file=sys.stderr, highlight=False)
    for warning in card["warnings"]:
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)


@data_app.command("audit")
def data_audit(
    task: Annotated[str, typer.Option(help="Task whose prepared dataset to audit.")] = "phishing",
    data_dir: _DataDir = None,
) -> None:
    """Can a TF-IDF classifier tell the sources apart? Writes audit.json and audit.md."""
    from phishgate.training.audit import audit_sources, load_audit_records, write_audit

    folder = data_dir or _settings().dataset_dir(task)
    records = load_audit_records(folder)
    with Console(file=sys.stderr).status("fitting TF-IDF + logistic regression probes"):
        report = audit_sources(records)
    paths = write_audit(report, folder)
    table = Table(title=f"shortcut audit · {folder}")
    for column in ("probe", "classes", "eval", "accuracy", "majority baseline", "balanced"):
        table.add_column(column)
    for probe in report.probes:
        table.add_row(
            probe.name,
            str(len(probe.classes)),
            str(probe.n_eval),
            f"{probe.accuracy:.3f}",
            f"{probe.baseline_accuracy:.3f}",
            f"{probe.balanced_accuracy:.3f}",
        )
    Console().print(table)
    Console().print(f"report: {escape(str(paths['md']))}")


@app.command("eval")
def eval_command(
    task: Annotated[str, typer.Option(help="Task: phishing or spam.")] = "phishing",
    predictor: Annotated[
        list[str] | None,
        typer.Option(
            "--predictor",
            "-p",
            help="zero-shot, tfidf or adapter; repeat for several (default: zero-shot, tfidf).",
        ),
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option(help="Adapter folder or models:/name@alias; adds the adapter predictor."),
    ] = None,
    split: Annotated[
        list[str] | None,
        typer.Option(
            "--split", help="Split to grade; repeat (default: test and holdout; none with --mail)."
        ),
    ] = None,
    data_dir: _DataDir = None,
    mail: Annotated[
        str | None,
        typer.Option(help="Also grade this mail: .eml file or folder, maildir, mbox, CSV, glob."),
    ] = None,
    label: Annotated[
        str | None, typer.Option(help="Label of every --mail message (a CSV may carry its own).")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="Grade a seeded sample of each split, stratified by label."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --limit samples.")] = 0,
    robustness: Annotated[
        bool | None,
        typer.Option(
            "--robustness/--no-robustness",
            help="Adversarial edits of test's phishing messages (default: on; off with --mail).",
        ),
    ] = None,
    robustness_limit: Annotated[
        int | None,
        typer.Option(min=1, help="Phishing messages in the robustness suite (default: --limit)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Report folder (default: <home>/reports/eval-<task>-<UTC time>)."),
    ] = None,
) -> None:
    """Grade predictors on the prepared splits (and on --mail); write reports and a summary."""
    from datetime import UTC, datetime

    from rich.markdown import Markdown

    from phishgate.core.tasks import get_task
    from phishgate.training.eval_run import examples_from_mail, run_eval
    from phishgate.training.evaluate import Example

    settings = _settings()
    chosen_task = get_task(task)
    chosen = list(predictor or (["adapter"] if adapter else ["zero-shot", "tfidf"]))
    if adapter and "adapter" not in chosen:
        chosen.append("adapter")
    if label is not None and mail is None:
        raise typer.BadParameter("--label needs --mail", param_hint="--label")
    prepared, _ = _prepare(settings)
    examples: list[Example] = []
    if mail is not None:
        from phishgate.core.model import load_tokenizer

        with _quiet_libraries():
            tokenizer = load_tokenizer(prepared.path)
        examples, skipped = examples_from_mail(
            mail, label, chosen_task, tokenizer, settings.max_input_tokens
        )
        for item in skipped:
            _error(f"{item.id}: skipped: {item.reason}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    err = Console(file=sys.stderr, highlight=False)  # bound now: _quiet_libraries swaps it
    with _quiet_libraries():
        summary = run_eval(
            settings,
            chosen_task.name,
            data_dir=data_dir or settings.dataset_dir(chosen_task.name),
            out_dir=out or settings.home / "reports" / f"eval-{chosen_task.name}-{stamp}",
            splits=tuple(split) if split is not None else (() if mail else ("test", "holdout")),
            predictors=chosen,
            adapter=adapter,
            limit=limit,
            seed=seed,
            robustness=robustness if robustness is not None else mail is None,
            robustness_limit=robustness_limit,
            mail=examples,
            progress=lambda line: err.print(f"[dim]{line}[/dim]"),
        )
    Console().print(Markdown(summary.markdown()))
    Console().print(f"reports: {summary.out_dir}")


@app.command()
def demo(
    train_config: Annotated[
        Path | None,
        typer.Option(help="Training YAML (default: the shipped training/configs/demo.yaml)."),
    ] = None,
    data_config: Annotated[
        Path | None,
        typer.Option(help="Data config YAML (default: every corpus in ../shared/data)."),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option(min=128, help="Token budget per email for data, training, serving.")
    ] = 256,
    eval_limit: Annotated[
        int, typer.Option(min=10, help="Test messages graded per predictor and at promotion.")
    ] = 200,
    messages: Annotated[
        int, typer.Option(min=2, help="Held-out test messages sent through Postfix.")
    ] = 12,
) -> None:
    """The whole gateway end to end: data, training, promotion, eval, mail through Postfix.

    Each stage reuses what an earlier run left in PHISHGATE_HOME (prepared model and data,
    an adapter trained on the same data, its eval), so a second run takes minutes.
    """
    from phishgate.core.demo import run_demo
    from phishgate.training import __file__ as training_init

    settings = _settings().model_copy(update={"max_input_tokens": max_tokens})
    config = train_config or Path(training_init).parent / "configs" / "demo.yaml"
    out = Console(highlight=False)
    started = time.perf_counter()
    with _quiet_libraries():
        result = run_demo(
            settings,
            train_config=config,
            data_config=data_config,
            eval_limit=eval_limit,
            messages=messages,
            say=lambda line: out.print(escape(line)),
        )
    _print_demo(out, settings, result, time.perf_counter() - started)
    if any(outcome.final.startswith("LOST") for outcome in result.mail):
        raise typer.Exit(EX_SOFTWARE)


def _print_demo(out: Console, settings: CoreSettings, result: DemoResult, seconds: float) -> None:
    mail = Table(
        title="Held-out test mail: Postfix -> milter sidecar -> classifier (score: P(phishing))"
    )
    # Widths of the longest values ("legitimate", "quarantine", "delivered"); the subject
    # takes what is left.
    for column, width in (("#", 2), ("truth", 10), ("score", 5), ("action", 10), ("outcome", 9)):
        mail.add_column(column, no_wrap=True, min_width=width)
    mail.add_column("subject", no_wrap=True, overflow="ellipsis", max_width=24)
    for i, outcome in enumerate(result.mail, 1):
        final = outcome.final
        if final == "rejected":
            final = f"rejected: {outcome.smtp_reply[:24]}"
        mail.add_row(
            str(i),
            outcome.truth,
            "-" if outcome.score is None else f"{outcome.score:.3f}",
            outcome.action,
            escape(final),
            escape(outcome.subject),
        )
    out.print(mail)
    grades = Table(title=f"Test split ({result.eval_dir})")
    for column in ("predictor", "F1", "precision", "recall", "ROC-AUC"):
        grades.add_column(column)
    for predictor, metrics in result.metrics.items():
        grades.add_row(
            predictor, *(_metric(metrics.get(k)) for k in ("f1", "precision", "recall", "roc_auc"))
        )
    out.print(grades)
    stages = Table(title=f"Stages ({seconds:.0f} s in all)")
    for column in ("stage", "seconds", "note"):
        stages.add_column(column, overflow="fold")
    for stage in result.stages:
        stages.add_row(stage.name, f"{stage.seconds:.1f}", escape(stage.note))
    out.print(stages)
    out.print(
        _grid(
            ("champion", f"models:/phishgate-phishing@champion = version {result.champion}"),
            ("promotion", result.promotion),
            ("MLflow UI", f".venv/bin/mlflow ui --backend-store-uri {settings.tracking_uri}"),
            ("eval plots", str(result.eval_dir)),
            ("service logs", str(settings.home / "demo-mailflow")),
        )
    )


serve_app = typer.Typer(
    help="Run the online services (classifier, milter sidecar).", no_args_is_help=True
)
app.add_typer(serve_app, name="serve")

# --- serve commands: thin, each imports its service's wiring module lazily ---


@serve_app.command("classifier")
def serve_classifier() -> None:
    """gRPC classifier (settings: PHISHGATE_CLASSIFIER_*); stops gracefully on SIGTERM."""
    from phishgate.classifier.app import main

    main()


@serve_app.command("milter")
def serve_milter(
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            help="milter (Postfix smtpd_milters) or smtp (content filter); "
            "default: PHISHGATE_MILTER_MODE, else milter.",
        ),
    ] = None,
) -> None:
    """Mail-flow sidecar (settings: PHISHGATE_MILTER_*); stops on SIGTERM."""
    from phishgate.milter.app import main

    main(mode)


bench_app = typer.Typer(
    help="Load, speed and cost: locust over gRPC, the physical limit, a naive baseline, "
    "the cost report. Commands of one benchmark share an --out folder.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")

# --- bench commands: thin, the work is in phishgate.bench.runs (imported lazily) ---

_BenchOut = Annotated[
    Path | None,
    typer.Option("--out", help="Benchmark folder (default: <home>/reports/bench-<UTC time>)."),
]
_BenchMessages = Annotated[int, typer.Option(min=1, help="Payload messages to prepare.")]
_BenchMail = Annotated[
    Path | None, typer.Option(help="Payloads from this .eml file or folder, not a data split.")
]


def _bench_out(out: Path | None, settings: CoreSettings) -> Path:
    from datetime import UTC, datetime

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return out or settings.home / "reports" / f"bench-{stamp}"


@bench_app.command("load")
def bench_load(
    out: _BenchOut = None,
    address: Annotated[
        str | None, typer.Option(help="Classifier HOST:PORT (default: start one on a free port).")
    ] = None,
    users: Annotated[str, typer.Option(help="Concurrent users per step, comma-separated.")] = (
        "1,8,32"
    ),
    seconds: Annotated[int, typer.Option(min=1, help="Duration of each step.")] = 30,
    task: Annotated[str, typer.Option(help="Task of the payload split.")] = "phishing",
    split: Annotated[str, typer.Option(help="Prepared split the payloads come from.")] = "test",
    data_dir: _DataDir = None,
    mail: _BenchMail = None,
    messages: _BenchMessages = 64,
    adapter: Annotated[
        str | None, typer.Option(help="Logical adapter named in requests (default: server's).")
    ] = None,
    classifier_adapters: Annotated[
        str | None,
        typer.Option(help="PHISHGATE_CLASSIFIER_ADAPTERS for a classifier started here."),
    ] = None,
    hardware: Annotated[
        str | None, typer.Option(help="Hardware profile charged (default: the local one).")
    ] = None,
) -> None:
    """Sweep concurrent users with locust over gRPC; write load.json and steps.csv."""
    from phishgate.bench.cost import load_profiles
    from phishgate.bench.runs import PayloadSource, run_load
    from phishgate.bench.settings import BenchSettings

    settings, bench = _settings(), BenchSettings()
    folder = _bench_out(out, settings)
    try:
        counts = [int(n) for n in users.split(",") if n.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"not a list of integers: {users!r}", param_hint="--users"
        ) from None
    err = Console(file=sys.stderr, highlight=False)
    result = run_load(
        settings,
        folder,
        PayloadSource(task=task, split=split, data_dir=data_dir, mail=mail, count=messages),
        address=address,
        users=counts,
        seconds=seconds,
        hardware=hardware or load_profiles(bench.profiles).local,
        adapter=bench.adapter if adapter is None else adapter,
        deadline_s=bench.deadline_s,
        classifier_env=(
            {"PHISHGATE_CLASSIFIER_ADAPTERS": classifier_adapters} if classifier_adapters else {}
        ),
        say=lambda line: err.print(f"[dim]{escape(line)}[/dim]"),
    )
    table = Table(title=f"load · {result.address} · {result.step_seconds} s per step")
    for column in ("users", "requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(column, justify="right")
    for s in result.steps:
        table.add_row(
            *map(str, (s.users, s.requests, s.failures)),
            f"{s.rps:.2f}",
            *(f"{v:g}" for v in (s.p50_ms, s.p95_ms, s.p99_ms)),
        )
    Console().print(table)
    Console().print(f"results: {escape(str(folder))}")


@bench_app.command("limit")
def bench_limit(
    out: _BenchOut = None,
    size: Annotated[int, typer.Option(min=64, help="Side of the square matmuls.")] = 2048,
    repeats: Annotated[int, typer.Option(min=1, help="Timed matmuls; the best counts.")] = 10,
    dtype: Annotated[str, typer.Option(help="torch dtype the service scores in.")] = "float32",
    task: Annotated[str, typer.Option(help="Task of the payload split.")] = "phishing",
    data_dir: _DataDir = None,
    mail: _BenchMail = None,
    messages: _BenchMessages = 64,
) -> None:
    """Best possible emails/s on this machine: matmul rate over FLOPs per scoring pass."""
    from phishgate.bench.runs import PayloadSource, run_limit

    settings = _settings()
    folder = _bench_out(out, settings)
    err = Console(file=sys.stderr, highlight=False)
    with _quiet_libraries():
        limit = run_limit(
            settings,
            folder,
            PayloadSource(task=task, data_dir=data_dir, mail=mail, count=messages),
            size=size,
            repeats=repeats,
            dtype=dtype,
            say=lambda line: err.print(f"[dim]{escape(line)}[/dim]"),
        )
    Console().print(
        _grid(
            ("matmul rate", f"{limit.matmul.flops_per_s / 1e9:.1f} GFLOP/s ({dtype})"),
            ("threads", str(limit.matmul.threads)),
            ("FLOPs per token", f"{limit.flops_per_token / 1e9:.3f} GFLOP"),
            ("mean tokens per email", f"{limit.mean_tokens:.0f} ({limit.emails} emails)"),
            ("best possible", f"{limit.emails_per_s:.2f} emails/s, {limit.tokens_per_s:.0f} tok/s"),
            ("results", str(folder)),
        )
    )


@bench_app.command("baseline")
def bench_baseline(
    out: _BenchOut = None,
    emails: Annotated[int, typer.Option(min=1, help="Payload messages to run it on.")] = 8,
    adapter: Annotated[
        str | None, typer.Option(help="LoRA adapter: a folder or models:/phishgate-<task>@alias.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generation budget.")] = 24,
    batch_size: Annotated[int, typer.Option(min=1, help="Scorer micro-batch size.")] = 8,
    task: Annotated[str, typer.Option(help="Task of the payload split.")] = "phishing",
    data_dir: _DataDir = None,
    mail: _BenchMail = None,
) -> None:
    """Naive generate()-and-parse-JSON vs one-pass scoring, on the same messages."""
    from phishgate.bench.runs import PayloadSource, run_naive_baseline

    settings = _settings()
    folder = _bench_out(out, settings)
    err = Console(file=sys.stderr, highlight=False)
    with _quiet_libraries():
        result = run_naive_baseline(
            settings,
            folder,
            PayloadSource(task=task, data_dir=data_dir, mail=mail, count=max(emails, 8)),
            emails=emails,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            say=lambda line: err.print(f"[dim]{escape(line)}[/dim]"),
        )
    Console().print(
        _grid(
            ("generate + parse", f"{result.generate.emails_per_s:.2f} emails/s"),
            ("one pass, batch 1", f"{result.score_single.emails_per_s:.2f} emails/s"),
            (
                f"one pass, batch {result.batch_size}",
                f"{result.score_batched.emails_per_s:.2f} emails/s",
            ),
            ("unparsed answers", f"{result.unparsed} of {result.emails}"),
            ("results", str(folder)),
        )
    )


@bench_app.command("report")
def bench_report(
    folder: Annotated[Path, typer.Argument(help="Benchmark folder (the commands' --out).")],
    p95_budget_ms: Annotated[
        float | None, typer.Option(help="Latency target (default: PHISHGATE_BENCH_P95_BUDGET_MS).")
    ] = None,
    profiles: Annotated[
        Path | None, typer.Option(help="Hardware and API prices (default: bench/profiles.yaml).")
    ] = None,
    measured: Annotated[
        list[str] | None,
        typer.Option(help="PROFILE=load.json measured on other hardware, e.g. h200=gpu/load.json."),
    ] = None,
    mail_flow: Annotated[
        Path | None, typer.Option(help="JSON of the mail-flow benchmark (Postfix + sidecar).")
    ] = None,
) -> None:
    """report.md with plots: throughput, latency, limit, baseline, cost vs the hosted API."""
    from phishgate.bench.runs import build_report
    from phishgate.bench.settings import BenchSettings

    bench = BenchSettings()
    others: dict[str, Path] = {}
    for spec in measured or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(
                f"expected PROFILE=FILE, got {spec!r}", param_hint="--measured"
            )
        others[name] = Path(path)
    files = build_report(
        folder,
        profiles_path=profiles or bench.profiles,
        p95_budget_ms=p95_budget_ms or bench.p95_budget_ms,
        measured=others,
        mail_flow=mail_flow,
    )
    Console().print(f"report: {escape(str(files.markdown))}")


registry_app = typer.Typer(
    help="Adapters in the MLflow registry: versions, aliases, promotion.", no_args_is_help=True
)
app.add_typer(registry_app, name="registry")


@registry_app.command("list")
def registry_list(
    task: Annotated[str, typer.Argument(help="Task: phishing or spam.")] = "phishing",
) -> None:
    """Versions of `phishgate-<task>` with their aliases and recorded dev metrics."""
    from phishgate.core.registry import list_versions, mlflow_client, model_name, version_metrics

    versions = list_versions(mlflow_client(_settings()), task)
    table = Table(title=model_name(task))
    for column in ("version", "aliases", "dev F1", "dev ECE", "base F1", "threshold", "base model"):
        table.add_column(column)
    for v in versions:
        metrics = version_metrics(v)
        table.add_row(
            v.version,
            ", ".join(v.aliases),
            _metric(metrics.get("dev_f1")),
            _metric(metrics.get("dev_ece")),
            _metric(metrics.get("base_dev_f1")),
            v.tags.get("threshold", ""),
            v.tags.get("base_model", ""),
        )
    Console().print(table)


@registry_app.command("promote")
def registry_promote(
    task: Annotated[str, typer.Argument(help="Task: phishing or spam.")] = "phishing",
    f1_margin: Annotated[
        float, typer.Option(help="How much lower the challenger's F1 may be.")
    ] = 0.0,
    ece_margin: Annotated[float, typer.Option(help="How much higher its ECE may be.")] = 0.01,
    limit: Annotated[
        int | None, typer.Option(help="Score a seeded sample of each set (faster).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Promote even if the gate fails (recorded).")] = False,
    data_dir: _DataDir = None,
) -> None:
    """Compare @challenger with @champion on test and holdout; move @champion if it passes."""
    from phishgate.training.promotion import promote

    report = promote(
        _settings(),
        task,
        data_dir=data_dir,
        limit=limit,
        f1_margin=f1_margin,
        ece_margin=ece_margin,
        force=force,
    )
    table = Table(
        title=f"challenger v{report.challenger_version} vs champion "
        f"{'v' + report.champion_version if report.champion_version else '(none)'}"
    )
    table.add_column("set")
    for alias in report.metrics:
        for metric in ("F1", "accuracy", "ECE"):
            table.add_column(f"{alias} {metric}")
    sets = sorted({name for per_set in report.metrics.values() for name in per_set})
    for name in sets:
        row = [name]
        for per_set in report.metrics.values():
            values = per_set.get(name, {})
            row += [_metric(values.get(key)) for key in ("f1", "accuracy", "ece")]
        table.add_row(*row)
    out = Console()
    out.print(table)
    for reason in report.decision.reasons:
        out.print(f"- {escape(reason)}")
    verdict = "promoted to @champion" if report.decision.promote else "not promoted"
    out.print(f"[bold]{verdict}[/bold]" + (" (forced)" if report.decision.forced else ""))


def _metric(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _settings() -> CoreSettings:
    from phishgate.core.settings import CoreSettings, load_settings

    return load_settings(CoreSettings)


def _prepare(settings: CoreSettings) -> tuple[PreparedModel, bool]:
    """The prepared base model, preparing it under a spinner if needed; True if it was."""
    from phishgate.core.model import prepare_base_model, resolve_base_model

    try:
        return resolve_base_model(settings), False
    except ModelNotPrepared:
        pass
    err = Console(file=sys.stderr)  # bound now: _quiet_libraries swaps sys.stderr
    with err.status("preparing the base model") as status, _quiet_libraries():
        prepared = prepare_base_model(settings, progress=lambda stage: status.update(stage))
    return prepared, True


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence transformers' logging and progress bars (the GGUF loader's tqdm included)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        yield


def _grid(*rows: tuple[str, str]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(key, escape(value))
    return grid


def _error(message: str) -> None:
    err = Console(file=sys.stderr, highlight=False)
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
