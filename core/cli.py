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

from phishgate.core.errors import ConfigError, InvalidMessage, ModelNotPrepared, PhishgateError

if TYPE_CHECKING:
    from phishgate.core.model import PreparedModel
    from phishgate.core.render import RenderedEmail
    from phishgate.core.settings import CoreSettings

# sysexits(3): EX_DATAERR, EX_NOINPUT, EX_UNAVAILABLE, EX_CONFIG.
EX_DATAERR, EX_NOINPUT, EX_UNAVAILABLE, EX_CONFIG = 65, 66, 69, 78
_EXIT_CODES: dict[type[PhishgateError], int] = {
    InvalidMessage: EX_DATAERR,
    ModelNotPrepared: EX_UNAVAILABLE,
    ConfigError: EX_CONFIG,
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
        typer.Option(min=64, help="Token budget per email (default: PHISHGATE_MAX_INPUT_TOKENS)."),
    ] = None,
) -> None:
    """Score emails with the zero-shot base model (prepared first if needed).

    A file that cannot be read or is not an email gets a one-line error on stderr; the
    others are still scored, and the exit code is non-zero.
    """
    from phishgate.core.tasks import get_task

    settings = _settings()
    chosen = get_task(task)
    budget = max_tokens or settings.max_input_tokens

    from phishgate.core.model import load_causal_lm, load_tokenizer
    from phishgate.core.render import render_email
    from phishgate.core.scoring import TransformersScorer

    prepared, _ = _prepare(settings)
    with _quiet_libraries():
        tokenizer = load_tokenizer(prepared.path)
        model = load_causal_lm(prepared.path, threads=settings.torch_threads)
    scorer = TransformersScorer(model, tokenizer, chosen)

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

    scores = scorer.score_batch(rendered) if rendered else []
    if json_lines:
        for path, score in zip(paths, scores, strict=True):
            record = {"file": str(path), "task": chosen.name, "model": prepared.short_id}
            typer.echo(json.dumps({**record, **dataclasses.asdict(score)}))
    elif scores:
        table = Table(title=f"{chosen.name} · zero-shot {prepared.short_id}")
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
) -> None:
    """Train a LoRA adapter with Ray Train, track it in MLflow, register it as challenger."""
    from phishgate.training.config import load_train_config
    from phishgate.training.job import run_training

    settings = _settings()
    job = load_train_config(config, overrides or [])
    out = Console()
    outcome = run_training(job, settings, say=out.print)
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


def _settings() -> CoreSettings:
    """CoreSettings from the environment; ConfigError naming each invalid variable."""
    from pydantic import ValidationError

    from phishgate.core.settings import CoreSettings

    try:
        return CoreSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"PHISHGATE_{'_'.join(str(part) for part in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None


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
