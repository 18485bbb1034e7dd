"""The dataset card: what went into a prepared dataset and what was left out, and why.

`build_card` returns a JSON-ready dict; `card_markdown` renders the same facts for people.
Sections: sources (read, rendered, skipped, manifest cross-check), skipped reasons with
sample ids, duplicates removed, campaign groups, per-split counts by label and source,
token lengths, split file hashes, languages per label, warnings, timing, and the config
and prompt version used.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from phishgate.core.tasks import Task
from phishgate.training.sources import DataConfig, Skipped
from phishgate.training.splits import HOLDOUT, SPLITS, SplitPlan

if TYPE_CHECKING:
    from phishgate.training.data import RenderedExample, SourceReport

SAMPLE_IDS = 5
TOP_LANGUAGES = 8
LARGEST_GROUPS = 10


def token_stats(lengths: Sequence[int], truncated: Sequence[bool]) -> dict[str, float | int]:
    """mean, p50, p95, max of token counts and the fraction truncated (zeros when empty)."""
    if not lengths:
        return {"mean": 0, "p50": 0, "p95": 0, "max": 0, "truncated_fraction": 0.0}
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    return {
        "mean": round(sum(ordered) / len(ordered), 1),
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": ordered[-1],
        "truncated_fraction": round(sum(truncated) / len(truncated), 4),
    }


def skip_reasons(skipped: Sequence[Skipped]) -> list[dict[str, Any]]:
    """Skips grouped by reason (numbers masked), most frequent first, with sample ids."""
    groups: dict[str, list[Skipped]] = defaultdict(list)
    for s in skipped:
        groups[re.sub(r"\d+", "N", s.reason)].append(s)
    return [
        {
            "reason": reason,
            "count": len(items),
            "sources": dict(Counter(s.source for s in items)),
            "examples": [s.id for s in items[:SAMPLE_IDS]],
        }
        for reason, items in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    ]


def build_card(
    *,
    config: DataConfig,
    task: Task,
    prompt_version: str,
    max_tokens: int,
    tokenizer_name: str,
    reports: Sequence[SourceReport],
    examples: Sequence[RenderedExample],
    skipped: Sequence[Skipped],
    plan: SplitPlan,
    files: Mapping[str, str],
    timing: Mapping[str, float | None],
) -> dict[str, Any]:
    """The card of one prepared dataset (JSON-ready; see the module docstring)."""
    by_id = {e.id: e for e in examples}
    rendered = Counter(e.source for e in examples)
    skipped_by_source = Counter(s.source for s in skipped)
    warnings: list[str] = []

    sources: dict[str, Any] = {}
    for r in reports:
        manifest = None
        if r.manifest is not None:
            manifest = {
                "file": r.manifest.manifest,
                "expected": r.manifest.expected,
                "found": r.manifest.found,
                "missing": list(r.manifest.missing),
                "unlisted": list(r.manifest.unlisted),
                "ok": r.manifest.ok,
            }
            if not r.manifest.ok:
                warnings.append(
                    f"source {r.name}: manifest lists {r.manifest.expected} files, "
                    f"{r.manifest.found} read"
                )
        if rendered[r.name] == 0:
            warnings.append(f"source {r.name}: no message could be rendered")
        sources[r.name] = {
            "label": r.label,
            "note": r.note,
            "read": len(r.messages) + len(r.skipped),
            "rendered": rendered[r.name],
            "skipped": skipped_by_source[r.name],
            "manifest": manifest,
        }
    bugs = sum(1 for s in skipped if s.reason.startswith("renderer bug"))
    if bugs:
        warnings.append(f"the renderer raised an unexpected error on {bugs} message(s)")

    removal_counts = Counter(r.kind for r in plan.removed)
    conflicts = [
        r
        for r in plan.removed
        if r.kind != "holdout-campaign" and by_id[r.id].label != by_id[r.other].label
    ]
    duplicates = {
        "exact_raw": removal_counts["exact-raw"],
        "exact_text": removal_counts["exact-text"],
        "near_pairs": plan.near_pairs,
        "near_removed": removal_counts["near"],
        "holdout_campaign_removed": removal_counts["holdout-campaign"],
        "label_conflicts": len(conflicts),
        "examples": {
            kind: [[r.id, r.other] for r in plan.removed if r.kind == kind][:SAMPLE_IDS]
            for kind in sorted(removal_counts)
        },
    }

    splits: dict[str, Any] = {}
    for split in (*SPLITS, HOLDOUT):
        if split not in files:
            continue
        members = [by_id[i] for i in plan.ids(split)]
        per_source: dict[str, Counter[str]] = defaultdict(Counter)
        for e in members:
            per_source[e.source][e.label] += 1
        labels = Counter(e.label for e in members)
        splits[split] = {
            "file": f"{split}.jsonl",
            "sha256": files[split],
            "count": len(members),
            "labels": {lab: labels[lab] for lab in task.labels},
            "sources": {s: dict(c) for s, c in sorted(per_source.items())},
            "tokens": token_stats([e.n_tokens for e in members], [e.truncated for e in members]),
        }
        if split != HOLDOUT:
            warnings.extend(
                f"{split} has no '{lab}' example" for lab in task.labels if not labels[lab]
            )

    kept = [by_id[i] for i in plan.assignment]
    languages: dict[str, list[list[Any]]] = {}
    for label in task.labels:
        counts = Counter(e.lang for e in kept if e.label == label)
        languages[label] = [[lang, n] for lang, n in counts.most_common(TOP_LANGUAGES)]

    group_info = []
    for group in plan.groups[:LARGEST_GROUPS]:
        members = [by_id[i] for i in group]
        group_info.append(
            {
                "size": len(group),
                "labels": dict(Counter(e.label for e in members)),
                "sources": dict(Counter(e.source for e in members)),
                "example": group[0],
                "subject": members[0].subject[:120],
            }
        )

    return {
        "task": task.name,
        "labels": list(task.labels),
        "prompt_version": prompt_version,
        "max_input_tokens": max_tokens,
        "tokenizer": tokenizer_name,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "totals": {
            "read": sum(v["read"] for v in sources.values()),
            "rendered": len(examples),
            "skipped": len(skipped),
            "removed": len(plan.removed),
            "in_splits": len(plan.assignment),
        },
        "sources": sources,
        "skipped": skip_reasons(skipped),
        "duplicates": duplicates,
        "groups": {
            "count": len(plan.groups),
            "multi_message": sum(1 for g in plan.groups if len(g) > 1),
            "largest": group_info,
        },
        "splits": splits,
        "languages": languages,
        "warnings": warnings,
        "timing": dict(timing),
        "config": config.model_dump(mode="json"),
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def card_markdown(card: Mapping[str, Any]) -> str:
    """The card as a Markdown document."""
    labels: list[str] = card["labels"]
    out = [
        f"# Dataset card: {card['task']}",
        "",
        f"prompt version `{card['prompt_version']}`, token budget {card['max_input_tokens']}, "
        f"tokenizer `{card['tokenizer']}`, created {card['created_at']}.",
        "",
        "Totals: " + ", ".join(f"{k} {v}" for k, v in card["totals"].items()) + ".",
        "",
    ]
    if card["warnings"]:
        out += ["## Warnings", "", *(f"- {w}" for w in card["warnings"]), ""]

    out += ["## Sources", ""]
    rows = []
    for name, s in card["sources"].items():
        m = s["manifest"]
        check = "—" if m is None else ("ok" if m["ok"] else f"{m['found']}/{m['expected']}")
        rows.append(
            [name, s["label"] or "(CSV rows)", s["read"], s["rendered"], s["skipped"], check]
        )
    out += _table(["source", "label", "read", "rendered", "skipped", "manifest"], rows)

    out += ["## Splits", ""]
    rows = []
    for split, s in card["splits"].items():
        t = s["tokens"]
        rows.append(
            [
                split,
                s["count"],
                *(s["labels"][lab] for lab in labels),
                t["mean"],
                t["p50"],
                t["p95"],
                t["max"],
                f"{t['truncated_fraction']:.1%}",
                f"`{s['sha256'][:16]}`",
            ]
        )
    header = [
        "split",
        "messages",
        *labels,
        "tokens mean",
        "p50",
        "p95",
        "max",
        "truncated",
        "sha256",
    ]
    out += _table(header, rows)

    names = list(card["sources"])
    out += ["### Messages per source and split", ""]
    rows = [
        [
            name,
            *(sum(card["splits"][sp]["sources"].get(name, {}).values()) for sp in card["splits"]),
        ]
        for name in names
    ]
    out += _table(["source", *card["splits"]], rows)

    d = card["duplicates"]
    out += [
        "## Duplicates and campaigns",
        "",
        f"- exact duplicates removed: {d['exact_raw']} (raw bytes), {d['exact_text']} "
        "(rendered text)",
        f"- near-duplicate pairs: {d['near_pairs']}; removed as near-duplicates: "
        f"{d['near_removed']}",
        f"- removed for sharing a campaign with a holdout source: {d['holdout_campaign_removed']}",
        f"- duplicates whose kept twin has another label: {d['label_conflicts']}",
        f"- campaign groups: {card['groups']['count']} "
        f"({card['groups']['multi_message']} with more than one message)",
        "",
    ]
    rows = [[g["size"], g["labels"], g["sources"], g["subject"]] for g in card["groups"]["largest"]]
    out += _table(["size", "labels", "sources", "subject"], rows)

    out += ["## Skipped", ""]
    if card["skipped"]:
        rows = [[s["count"], s["reason"], ", ".join(s["examples"])] for s in card["skipped"]]
        out += _table(["count", "reason", "examples"], rows)
    else:
        out += ["Nothing skipped.", ""]

    out += ["## Languages (py3langid on the body text)", ""]
    rows = [
        [label, ", ".join(f"{lang} {n}" for lang, n in langs)]
        for label, langs in card["languages"].items()
    ]
    out += _table(["label", "top languages"], rows)
    out += ["## Timing", "", ", ".join(f"{k} {v}" for k, v in card["timing"].items()), ""]
    return "\n".join(out)
