"""The benchmark report: report.md, report.json and PNG plots from the results of a run.

Every input but the profiles is optional; a missing one gives its section a "not
measured" line and the command that measures it. Mail-flow numbers come from a JSON file
written by the mail-flow benchmark (services/milter): its scalars are shown as they are.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phishgate.bench.baseline import BaselineResult
from phishgate.bench.cost import CostRow, Profiles, cost_rows, sustained_step
from phishgate.bench.limit import Limit
from phishgate.bench.load import FEW_REQUESTS, LoadResult


@dataclass
class ReportInputs:
    """What a report is made of. `measured` maps other hardware profiles (GPUs) to load
    results measured on them; `load` is charged as its own `hardware` profile."""

    profiles: Profiles
    p95_budget_ms: float
    load: LoadResult | None = None
    limit: Limit | None = None
    baseline: BaselineResult | None = None
    measured: dict[str, LoadResult] = field(default_factory=dict)
    mail_flow: dict[str, Any] | None = None
    api_tokens: tuple[float, float] | None = None
    """Mean (input, output) hosted-API tokens per email; default: from the load payloads."""


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    json: Path
    plots: tuple[Path, ...]


def write_report(inputs: ReportInputs, out_dir: Path) -> ReportFiles:
    """Write report.md, report.json and the plots that have data into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _cost_rows(inputs)
    plots = []
    results = {inputs.load.hardware: inputs.load} if inputs.load else {}
    results.update(inputs.measured)
    if results:
        plots += _load_plots(results, out_dir)
    if rows:
        plots.append(_cost_plot(rows, out_dir))
    markdown = "\n".join(_markdown(inputs, rows, [p.name for p in plots])) + "\n"
    md_path = out_dir / "report.md"
    md_path.write_text(markdown)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(_summary(inputs, rows), indent=2) + "\n")
    return ReportFiles(md_path, json_path, tuple(plots))


def _api_tokens(inputs: ReportInputs) -> tuple[float, float] | None:
    if inputs.api_tokens is not None:
        return inputs.api_tokens
    for result in (inputs.load, *inputs.measured.values()):
        if result and "mean_api_input_tokens" in result.payloads:
            return (
                float(result.payloads["mean_api_input_tokens"]),
                float(result.payloads["mean_api_output_tokens"]),
            )
    return None


def _cost_rows(inputs: ReportInputs) -> list[CostRow]:
    tokens = _api_tokens(inputs)
    if tokens is None:
        return []
    measured = {name: result.steps for name, result in inputs.measured.items()}
    if inputs.load is not None:
        measured[inputs.load.hardware] = inputs.load.steps
    return cost_rows(inputs.profiles, measured, inputs.p95_budget_ms, *tokens)


def _best_rps(result: LoadResult) -> float:
    """Highest requests/s of a step without failures (0 when every step failed)."""
    return max((s.rps for s in result.steps if s.failures == 0 and s.requests), default=0.0)


def _summary(inputs: ReportInputs, rows: list[CostRow]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "p95_budget_ms": inputs.p95_budget_ms,
        "load": inputs.load.to_dict() if inputs.load else None,
        "measured": {name: r.to_dict() for name, r in inputs.measured.items()},
        "limit": inputs.limit.to_dict() if inputs.limit else None,
        "baseline": inputs.baseline.to_dict() if inputs.baseline else None,
        "cost": [asdict(row) for row in rows],
        "mail_flow": inputs.mail_flow,
    }
    if inputs.load and inputs.limit:
        summary["fraction_of_limit"] = _best_rps(inputs.load) / inputs.limit.emails_per_s
    return summary


def _markdown(inputs: ReportInputs, rows: list[CostRow], plots: list[str]) -> Iterator[str]:
    yield "# phishgate benchmark"
    yield ""
    yield from _load_section(inputs, plots)
    yield from _limit_section(inputs)
    yield from _baseline_section(inputs)
    yield from _cost_section(inputs, rows, plots)
    yield from _mail_flow_section(inputs)


def _load_section(inputs: ReportInputs, plots: list[str]) -> Iterator[str]:
    yield "## Classifier under load (locust over gRPC)"
    yield ""
    results = {inputs.load.hardware: inputs.load} if inputs.load else {}
    results.update(inputs.measured)
    if not results:
        yield "Not measured: run `phishgate bench load`."
        yield ""
        return
    for name, result in results.items():
        payloads = result.payloads
        profile = inputs.profiles.hardware.get(name)
        yield (
            f"**{name}** ({profile.description if profile else 'unknown profile'}): "
            f"{payloads.get('count', '?')} messages from {payloads.get('source', '?')}, "
            f"{payloads.get('mean_tokens', 0):.0f} tokens on average "
            f"(budget {payloads.get('max_input_tokens', '?')}); "
            f"{result.step_seconds} s per step; classifier at {result.address}"
            f"{' (started by the benchmark)' if result.started_classifier else ''}."
        )
        yield ""
        yield "| users | requests | failures | req/s | tokens/s | p50 ms | p95 ms | p99 ms |"
        yield "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        mean_tokens = float(payloads.get("mean_tokens", 0.0))
        for s in result.steps:
            yield (
                f"| {s.users} | {s.requests} | {s.failures} | {s.rps:.2f} | "
                f"{s.rps * mean_tokens:.0f} | {s.p50_ms:g} | {s.p95_ms:g} | {s.p99_ms:g} |"
            )
        step = sustained_step(result.steps, inputs.p95_budget_ms)
        yield ""
        few = [str(s.users) for s in result.steps if s.requests < FEW_REQUESTS]
        if few:
            yield (
                f"Steps with fewer than {FEW_REQUESTS} requests (users: {', '.join(few)}) say "
                "little about latency: measure them with longer steps."
            )
            yield ""
        yield (
            f"Sustained at p95 <= {inputs.p95_budget_ms:g} ms: "
            + (
                f"{step.rps:.2f} req/s with {step.users} users."
                if step
                else "no step met the budget without failures."
            )
        )
        yield ""
    for plot in ("throughput.png", "latency.png"):
        if plot in plots:
            yield f"![{plot.removesuffix('.png')}]({plot})"
    yield ""


def _limit_section(inputs: ReportInputs) -> Iterator[str]:
    yield "## Physical limit of this machine"
    yield ""
    limit = inputs.limit
    if limit is None:
        yield "Not measured: run `phishgate bench limit`."
        yield ""
        return
    m = limit.matmul
    yield "| quantity | value |"
    yield "| --- | ---: |"
    yield (
        f"| dense matmul rate ({m.dtype}, {m.size}x{m.size}, {m.threads} threads, "
        f"best of {m.repeats}) | {m.flops_per_s / 1e9:.1f} GFLOP/s |"
    )
    yield f"| FLOPs per token of a scoring pass | {limit.flops_per_token / 1e9:.3f} GFLOP |"
    yield f"| mean tokens per email ({limit.emails} emails) | {limit.mean_tokens:.0f} |"
    yield f"| of which the shared prefix, computed once | {limit.prefix_tokens} |"
    yield f"| best possible emails/s | {limit.emails_per_s:.2f} |"
    yield f"| best possible tokens/s | {limit.tokens_per_s:.0f} |"
    yield (
        f"| best possible emails/s computing every token | {limit.whole_prompt_emails_per_s:.2f} |"
    )
    if inputs.load is not None:
        best = _best_rps(inputs.load)
        mean_tokens = float(inputs.load.payloads.get("mean_tokens", limit.mean_tokens))
        yield (
            f"| service reached (best step without failures) | {best:.2f} emails/s, "
            f"{best * mean_tokens:.0f} tokens/s |"
        )
        yield f"| fraction of the limit | {best / limit.emails_per_s:.1%} |"
        yield (
            f"| fraction of the every-token limit | {best / limit.whole_prompt_emails_per_s:.1%} |"
        )
    yield ""


def _baseline_section(inputs: ReportInputs) -> Iterator[str]:
    yield "## Naive baseline: generate a JSON answer and parse it"
    yield ""
    b = inputs.baseline
    if b is None:
        yield "Not measured: run `phishgate bench baseline`."
        yield ""
        return
    yield (
        f"{b.emails} emails, {b.mean_tokens:.0f} prompt tokens on average, model {b.model}; "
        f"generation is greedy, at most {b.max_new_tokens} new tokens "
        f"({b.mean_generated_tokens:.1f} on average), {b.unparsed} answers not parseable; "
        f"the parsed label agrees with the scorer's on {b.agreement:.0%} of emails."
    )
    yield ""
    if b.sample_answers:
        yield f"First answer generated: `{b.sample_answers[0].strip()[:120]}`"
        yield ""
    yield "| approach | emails/s | vs generate-and-parse |"
    yield "| --- | ---: | ---: |"
    base = b.generate.emails_per_s
    for name, rate in (
        ("generate() + parse JSON, one email at a time", b.generate),
        ("one forward pass, last-position logits, batch 1", b.score_single),
        (f"one forward pass, length-sorted batches of {b.batch_size}", b.score_batched),
    ):
        ratio = rate.emails_per_s / base if base > 0 else 0.0
        yield f"| {name} | {rate.emails_per_s:.2f} | {ratio:.1f}x |"
    yield ""


def _cost_section(inputs: ReportInputs, rows: list[CostRow], plots: list[str]) -> Iterator[str]:
    yield "## Cost per email"
    yield ""
    if not rows:
        yield "Not computed: no hosted-API token counts (run `phishgate bench load` first)."
        yield ""
        return
    yield (
        f"Hardware is charged its $/hour over the requests/s it sustains with p95 <= "
        f"{inputs.p95_budget_ms:g} ms and no failures; the hosted API its token price times "
        "the tokens of the same emails (rendered text plus a JSON instruction, counted with "
        "the base model's tokenizer). Prices: bench/profiles.yaml."
    )
    yield ""
    yield "| option | $/hour | req/s | $ per request | $ per million emails | note |"
    yield "| --- | ---: | ---: | ---: | ---: | --- |"
    for r in rows:
        yield (
            f"| {r.option} ({r.description}) | "
            f"{'' if r.dollars_per_hour is None else f'{r.dollars_per_hour:g}'} | "
            f"{'' if r.rps is None else f'{r.rps:.2f}'} | "
            f"{'' if r.per_request is None else f'{r.per_request:.3g}'} | "
            f"{'' if r.per_million is None else f'{r.per_million:,.2f}'} | {r.note} |"
        )
    api = rows[-1]
    measured = [(r.option, r.per_million) for r in rows[:-1] if r.per_million]
    if api.per_million and measured:
        yield ""
        for option, per_million in measured:
            if per_million <= api.per_million:
                yield f"- {option}: {api.per_million / per_million:.1f}x cheaper than {api.option}"
            else:
                yield f"- {option}: {per_million / api.per_million:.1f}x dearer than {api.option}"
    if "cost.png" in plots:
        yield ""
        yield "![cost per million emails](cost.png)"
    yield ""


def _mail_flow_section(inputs: ReportInputs) -> Iterator[str]:
    yield "## Mail flow (Postfix + sidecar + classifier)"
    yield ""
    if not inputs.mail_flow:
        yield "Not measured: pass the mail-flow benchmark's JSON with `--mail-flow FILE`."
        yield ""
        return
    yield "| quantity | value |"
    yield "| --- | ---: |"
    for key, value in _flatten(inputs.mail_flow):
        yield f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
    yield ""


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{name}.")
        elif isinstance(value, str | int | float | bool):
            yield name, value


def _load_plots(results: Mapping[str, LoadResult], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    throughput = out_dir / "throughput.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        users = [s.users for s in result.steps]
        ax.plot(users, [s.rps for s in result.steps], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("concurrent users")
    ax.set_ylabel("requests/s")
    ax.set_title("Classify throughput")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(throughput, dpi=100)
    plt.close(fig)

    latency = out_dir / "latency.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        users = [s.users for s in result.steps]
        for key, style in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
            values = [getattr(s, key) for s in result.steps]
            ax.plot(users, values, style, marker="o", label=f"{name} {key.removesuffix('_ms')}")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("concurrent users")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Classify latency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(latency, dpi=100)
    plt.close(fig)
    return [throughput, latency]


def _cost_plot(rows: list[CostRow], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out_dir / "cost.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r.option for r in rows]
    values = [r.per_million or 0.0 for r in rows]
    bars = ax.bar(names, values, color=["tab:blue"] * (len(rows) - 1) + ["tab:orange"])
    for bar, row in zip(bars, rows, strict=True):
        label = f"${row.per_million:,.2f}" if row.per_million is not None else "not measured"
        ax.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize="small",
        )
    ax.set_ylabel("$ per million emails")
    ax.set_title("Cost per million emails")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
