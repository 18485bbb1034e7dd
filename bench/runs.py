"""What each `phishgate bench` command does, given its options; the CLI only parses them.

All commands of one benchmark share an output folder: `load` writes load.json (and the
payloads under payloads/), `limit` limit.json, `baseline` baseline.json, and `report`
reads them back into report.md.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from phishgate.bench.baseline import BaselineResult
from phishgate.bench.cost import load_profiles
from phishgate.bench.limit import Limit
from phishgate.bench.load import LoadResult
from phishgate.bench.payloads import PayloadSet
from phishgate.bench.report import ReportFiles
from phishgate.core.errors import ConfigError
from phishgate.core.settings import CoreSettings

PAYLOADS = "payloads"
LOAD_JSON, LIMIT_JSON, BASELINE_JSON = "load.json", "limit.json", "baseline.json"

Say = Callable[[str], None]
_T = TypeVar("_T")


@dataclass(frozen=True)
class PayloadSource:
    """Where payload messages come from: `mail` (.eml file or folder) if set, else a
    seeded sample of `split` of the prepared dataset `data_dir` (default
    <home>/data/<task>)."""

    task: str = "phishing"
    split: str = "test"
    data_dir: Path | None = None
    mail: Path | None = None
    count: int = 64
    seed: int = 0


def ensure_payloads(
    settings: CoreSettings, out_dir: Path, source: PayloadSource, say: Say
) -> PayloadSet:
    """The payloads under `out_dir`/payloads, written first if there are none yet."""
    from phishgate.bench.payloads import (
        load_payload_set,
        mail_messages,
        split_messages,
        write_payloads,
    )
    from phishgate.core.model import load_tokenizer, prepare_base_model
    from phishgate.core.tasks import get_task

    folder = out_dir / PAYLOADS
    with contextlib.suppress(ConfigError):
        existing = load_payload_set(folder)
        say(f"payloads: {len(existing.payloads)} messages already in {folder}")
        return existing
    task = get_task(source.task)
    if source.mail is not None:
        messages = mail_messages(source.mail, source.count)
        origin = str(source.mail)
    else:
        data_dir = source.data_dir or settings.dataset_dir(task.name)
        say(f"payloads: reading {source.count} messages of {data_dir}/{source.split}")
        messages = split_messages(data_dir, source.split, source.count, source.seed)
        origin = f"{data_dir.name}/{source.split} (seed {source.seed})"
    tokenizer = load_tokenizer(prepare_base_model(settings).path)
    payloads = write_payloads(messages, folder, task, tokenizer, settings.max_input_tokens, origin)
    say(f"payloads: {len(payloads.payloads)} messages written to {folder}")
    return payloads


def run_load(
    settings: CoreSettings,
    out_dir: Path,
    source: PayloadSource,
    *,
    address: str | None,
    users: Sequence[int],
    seconds: int,
    hardware: str,
    adapter: str,
    deadline_s: float,
    classifier_env: Mapping[str, str],
    say: Say,
) -> LoadResult:
    """Payloads, then the sweep against `address` or a classifier started for it."""
    from phishgate.bench.load import classifier_process, run_sweep

    payloads = ensure_payloads(settings, out_dir, source, say)
    started = address is None
    with contextlib.ExitStack() as stack:
        if address is None:
            say("starting `phishgate serve classifier` on a free port")
            address = stack.enter_context(
                classifier_process(out_dir / "classifier.log", classifier_env)
            )
            say(f"classifier serving at {address}")
        return run_sweep(
            address,
            users,
            seconds,
            payloads.folder,
            payloads.summary(),
            out_dir,
            hardware=hardware,
            adapter=adapter,
            deadline_s=deadline_s,
            started_classifier=started,
            say=say,
        )


def run_limit(
    settings: CoreSettings,
    out_dir: Path,
    source: PayloadSource,
    *,
    size: int,
    repeats: int,
    dtype: str,
    say: Say,
) -> Limit:
    """Matmul rate and FLOPs per email at the payloads' token lengths; writes limit.json."""
    from phishgate.bench.limit import ModelShape, measure_matmul_rate, physical_limit
    from phishgate.core.model import load_tokenizer, prepare_base_model
    from phishgate.core.scoring import prompt_prefix_ids
    from phishgate.core.tasks import get_task

    payloads = ensure_payloads(settings, out_dir, source, say)
    base = prepare_base_model(settings)
    shape = ModelShape.from_checkpoint(base.path)
    prefix = prompt_prefix_ids(load_tokenizer(base.path), get_task(payloads.task))
    say(f"timing {repeats} {dtype} matmuls of {size}x{size}")
    rate = measure_matmul_rate(size, repeats, dtype, settings.torch_threads)
    limit = physical_limit(rate, shape, [p.n_tokens for p in payloads.payloads], len(prefix))
    _write_json(out_dir / LIMIT_JSON, limit.to_dict())
    return limit


def run_naive_baseline(
    settings: CoreSettings,
    out_dir: Path,
    source: PayloadSource,
    *,
    emails: int,
    adapter: str | None,
    max_new_tokens: int,
    batch_size: int,
    say: Say,
) -> BaselineResult:
    """Generate-and-parse vs one-pass scoring on the first `emails` payloads."""
    from phishgate.bench.baseline import run_baseline
    from phishgate.core.registry import load_scoring_model
    from phishgate.core.render import render_email
    from phishgate.core.tasks import get_task

    payloads = ensure_payloads(settings, out_dir, source, say)
    task = get_task(payloads.task)
    loaded = load_scoring_model(settings, adapter)
    chosen = payloads.payloads[:emails]
    rendered = [
        render_email(
            (payloads.folder / p.file).read_bytes(),
            task,
            loaded.tokenizer,
            payloads.max_input_tokens,
        )
        for p in chosen
    ]
    say(f"generate-and-parse, then one-pass scoring, on {len(rendered)} emails")
    result = run_baseline(
        loaded.model,
        loaded.tokenizer,
        task,
        rendered,
        model_name=loaded.name,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    _write_json(out_dir / BASELINE_JSON, result.to_dict())
    return result


def build_report(
    out_dir: Path,
    *,
    profiles_path: Path,
    p95_budget_ms: float,
    measured: Mapping[str, Path],
    mail_flow: Path | None,
) -> ReportFiles:
    """report.md from whatever results `out_dir` holds, plus other machines' load.json."""
    from phishgate.bench.baseline import BaselineResult
    from phishgate.bench.limit import Limit
    from phishgate.bench.load import read_load_result
    from phishgate.bench.payloads import load_payload_set
    from phishgate.bench.report import ReportInputs, write_report

    profiles = load_profiles(profiles_path)
    unknown = sorted(set(measured) - set(profiles.hardware))
    if unknown:
        raise ConfigError(
            f"unknown hardware profile(s) {', '.join(unknown)}; "
            f"known: {', '.join(profiles.hardware)}"
        )
    inputs = ReportInputs(profiles=profiles, p95_budget_ms=p95_budget_ms)
    if (out_dir / LOAD_JSON).is_file():
        inputs.load = read_load_result(out_dir / LOAD_JSON)
    if (out_dir / LIMIT_JSON).is_file():
        inputs.limit = _parse(out_dir / LIMIT_JSON, Limit.from_dict)
    if (out_dir / BASELINE_JSON).is_file():
        inputs.baseline = _parse(out_dir / BASELINE_JSON, BaselineResult.from_dict)
    inputs.measured = {name: read_load_result(path) for name, path in measured.items()}
    if inputs.load is None:
        with contextlib.suppress(ConfigError):
            summary = load_payload_set(out_dir / PAYLOADS).summary()
            inputs.api_tokens = (
                summary["mean_api_input_tokens"],
                summary["mean_api_output_tokens"],
            )
    if mail_flow is not None:
        inputs.mail_flow = _read_json(mail_flow)
    return write_report(inputs, out_dir)


def _parse(path: Path, parse: Callable[[dict[str, Any]], _T]) -> _T:
    try:
        return parse(_read_json(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a result of this benchmark ({exc})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
