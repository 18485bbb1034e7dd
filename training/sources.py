"""Labelled mail sources: the typed data config and the container readers.

A reader only opens containers (files, maildirs, mbox files, CSV rows) and yields each
message's raw RFC 822 bytes; everything else (MIME, charsets, HTML, token budget) is the
one renderer's job (DESIGN invariant 1). A CSV row becomes a synthesised RFC 822 message
so that it takes the same path.

Errors that make a source unusable as configured (nothing matched, missing CSV columns,
a label outside the task's label set) raise DataSourceError naming the source, file and
line. Problems with single messages (an unreadable file, a CSV row that is not UTF-8)
are yielded as `Skipped` so the caller can count them: nothing is dropped silently.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from phishgate.core.config_files import describe_validation_error, read_yaml_mapping
from phishgate.core.errors import ConfigError
from phishgate.core.tasks import get_task
from phishgate.training.splits import in_holdout

Format = Literal["eml", "maildir", "mbox", "csv", "auto"]
FORMATS: tuple[str, ...] = ("eml", "maildir", "mbox", "csv", "auto")
CSV_COLUMNS = ("subject", "body", "sender", "label")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "data" / "default.yaml"
MANIFEST_NAMES = ("manifest.csv", "MANIFEST.tsv")

_NAME = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$"
_GLOB_CHARS = re.compile(r"[*?\[]")
# An mbox envelope: `From <sender> <asctime date>`, e.g. `From a@b.org  Sun Jun  1 00:08:19 2014`.
_ENVELOPE = re.compile(rb"^From \S+.* \d{1,2}:\d{2}(?::\d{2})? .*\d{4}\s*$")


class DataSourceError(ConfigError):
    """A data source that cannot be used as configured (missing, empty, wrong columns...)."""


class SourceConfig(BaseModel):
    """One labelled source. `path` may be a glob; relative paths resolve against the data
    root. `label` applies to every message; a CSV without it takes each row's `label`.
    `tasks` limits the source to some tasks (default: every task). A name `corpus/part`
    puts the source in corpus `corpus` (holdout and audit can name the corpus)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME, description="Unique name; `corpus/part` groups sources.")
    path: str = Field(min_length=1, description="File, folder or glob of the messages.")
    format: Format = Field(default="auto", description="Container format; `auto` detects per file.")
    label: str | None = Field(default=None, description="Label of every message (CSV: optional).")
    tasks: tuple[str, ...] | None = Field(default=None, description="Tasks using this source.")
    note: str = Field(default="", description="Why this source has this label (shown in the card).")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for name in value or ():
            try:
                get_task(name)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _label_required(self) -> SourceConfig:
        if self.label is None and self.format not in ("csv", "auto"):
            raise ValueError("label is required unless format is csv or auto (CSV rows carry one)")
        return self

    @property
    def corpus(self) -> str:
        return self.name.split("/", 1)[0]


class DataConfig(BaseModel):
    """What to prepare: the task, the sources, the split and the deduplication policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(default="phishing", description="Task name from phishgate.core.tasks.")
    data_root: Path | None = Field(
        default=None, description="Folder relative source paths resolve against."
    )
    sources: tuple[SourceConfig, ...] = Field(min_length=1)
    seed: int = Field(default=0, description="Seed of the group-to-split assignment.")
    split: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "dev": 0.1, "test": 0.1},
        description="Fractions of train/dev/test; they sum to 1.",
    )
    holdout_sources: tuple[str, ...] = Field(
        default=(), description="Source or corpus names written only to holdout.jsonl."
    )
    near_duplicate_threshold: float = Field(default=0.8, gt=0.0, le=1.0)
    near_duplicates: Literal["drop", "keep"] = Field(
        default="drop",
        description="drop: keep one per near-duplicate cluster; keep: only group them.",
    )
    max_per_source: int | None = Field(
        default=None,
        ge=1,
        description="Read at most this many messages per source (in file order).",
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        try:
            get_task(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("split")
    @classmethod
    def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
        if set(value) != {"train", "dev", "test"}:
            raise ValueError("needs exactly the keys train, dev, test")
        if any(v < 0 for v in value.values()) or abs(sum(value.values()) - 1.0) > 1e-6:
            raise ValueError("fractions must be >= 0 and sum to 1")
        if value["train"] <= 0:
            raise ValueError("train fraction must be > 0")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        task = get_task(self.task)
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate source names: {', '.join(dupes)}")
        active = self.active_sources()
        if not active:
            raise ValueError(f"no source is used by task {self.task!r}")
        for source in active:
            if source.label is not None and source.label not in task.labels:
                raise ValueError(
                    f"source {source.name!r}: label {source.label!r} is not a label of task "
                    f"{task.name!r} ({', '.join(task.labels)}); use `tasks:` to limit the source"
                )
        for held in self.holdout_sources:
            if not any(in_holdout(s.name, [held]) for s in active):
                raise ValueError(f"holdout source {held!r} names no source of this task")
        return self

    def active_sources(self) -> list[SourceConfig]:
        """The sources this config's task uses, in config order."""
        return [s for s in self.sources if s.tasks is None or self.task in s.tasks]


def load_data_config(
    path: Path,
    *,
    task: str | None = None,
    data_root: Path | None = None,
    sources: Sequence[SourceConfig] = (),
    holdout_sources: Sequence[str] | None = None,
    seed: int | None = None,
    max_per_source: int | None = None,
) -> DataConfig:
    """Read a YAML data config and apply overrides (CLI flags).

    A source override replaces the configured source of the same name or is appended.
    A `data_root` override is relative to the current directory; the YAML's is relative
    to the config file's folder, which is also the default. ConfigError names the file
    and each invalid field.
    """
    raw = read_yaml_mapping(path, "data config")
    overrides: dict[str, Any] = {
        "task": task,
        "data_root": data_root.expanduser().resolve() if data_root else None,
        "holdout_sources": holdout_sources,
        "seed": seed,
        "max_per_source": max_per_source,
    }
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if sources:
        configured = raw.get("sources")
        listed = configured if isinstance(configured, list) else []
        merged = {s.get("name"): s for s in listed if isinstance(s, dict)}
        merged.update({s.name: s.model_dump(exclude_defaults=True) for s in sources})
        raw["sources"] = list(merged.values())
    root = Path(raw.get("data_root") or ".")
    raw["data_root"] = str((path.resolve().parent / root).resolve())
    try:
        return DataConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"data config {path}: {describe_validation_error(exc)}") from None


def parse_source_override(spec: str) -> SourceConfig:
    """A source from `NAME=PATH:LABEL[:FORMAT]` (the CLI's `--source`); ConfigError if bad.

    A relative PATH is made absolute against the current directory (where the command
    runs), not the config's data root.
    """
    name, sep, rest = spec.partition("=")
    parts = rest.rsplit(":", 2)
    fmt = "auto"
    if len(parts) == 3 and parts[2] in FORMATS:
        fmt = parts.pop()
    elif len(parts) == 3:
        parts = [parts[0] + ":" + parts[1], parts[2]]
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--source {spec!r}: expected NAME=PATH:LABEL[:FORMAT]")
    try:
        return SourceConfig.model_validate(
            {
                "name": name,
                "path": str(Path.cwd() / Path(parts[0]).expanduser()),
                "label": parts[1],
                "format": fmt,
            }
        )
    except ValidationError as exc:
        raise ConfigError(f"--source {spec!r}: {describe_validation_error(exc)}") from None


@dataclass(frozen=True)
class RawMessage:
    """One message as read: `id` is `<source>:<path in source>[#n | :line]`."""

    id: str
    source: str
    label: str
    raw: bytes
    file: Path

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


@dataclass(frozen=True)
class Skipped:
    """A message left out before splitting (unreadable, rejected...), with the reason."""

    id: str
    source: str
    reason: str


def resolve_path(source: SourceConfig, root: Path) -> tuple[Path, list[Path]]:
    """The folder ids are relative to, and the existing paths the source's pattern matches."""
    pattern = Path(source.path).expanduser()
    if not pattern.is_absolute():
        pattern = root / pattern
    if not _GLOB_CHARS.search(str(pattern)):
        base = pattern if pattern.is_dir() else pattern.parent
        return base, [pattern] if pattern.exists() else []
    cut = next(i for i, p in enumerate(pattern.parts) if _GLOB_CHARS.search(p))
    base = Path(*pattern.parts[:cut])
    return base, [Path(p) for p in sorted(glob.glob(str(pattern), recursive=True))]


def read_source(
    source: SourceConfig, root: Path, labels: Sequence[str], limit: int | None = None
) -> Iterator[RawMessage | Skipped]:
    """Every message of `source` in file order (at most `limit`), then nothing else.

    DataSourceError if the path matches nothing or holds no message at all, if a CSV
    lacks columns, or if a label is not in `labels`.
    """
    base, matches = resolve_path(source, root)
    if not matches:
        raise DataSourceError(f"source {source.name!r} is empty: {source.path!r} matches nothing")
    count = 0
    for path in matches:
        for entry in _read_path(source, path, base, labels):
            yield entry
            count += 1
            if limit is not None and count >= limit:
                return
    if count == 0:
        raise DataSourceError(f"source {source.name!r} is empty: no messages under {source.path!r}")


def _read_path(
    source: SourceConfig, path: Path, base: Path, labels: Sequence[str]
) -> Iterator[RawMessage | Skipped]:
    fmt = source.format
    if fmt == "maildir" and not _is_maildir(path):
        raise DataSourceError(f"source {source.name!r}: {path} is not a maildir (no cur/ or new/)")
    if fmt in ("maildir", "auto") and _is_maildir(path):
        yield from _read_maildir(source, path, base)
    elif path.is_dir():
        files = (p for p in path.rglob("*") if (p.is_file() or p.is_symlink()) and not p.is_dir())
        for file in sorted(f for f in files if not _hidden(f, path)):
            yield from _read_file(source, file, base, labels)
    else:
        yield from _read_file(source, path, base, labels)


def _hidden(path: Path, top: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(top).parts)


def _is_maildir(path: Path) -> bool:
    return path.is_dir() and ((path / "cur").is_dir() or (path / "new").is_dir())


def _rel(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _read_file(
    source: SourceConfig, file: Path, base: Path, labels: Sequence[str]
) -> Iterator[RawMessage | Skipped]:
    ident = f"{source.name}:{_rel(file, base)}"
    try:
        data = file.read_bytes()
    except OSError as exc:
        yield Skipped(ident, source.name, f"unreadable file: {exc.strerror}")
        return
    fmt = source.format if source.format != "auto" else detect_format(file, data)
    if fmt == "csv":
        yield from _read_csv(source, file, data, ident, labels)
    elif fmt == "mbox":
        yield from _read_mbox(source, file, data, ident)
    else:
        label = _label(source, file)
        yield RawMessage(ident, source.name, label, data, file)


def detect_format(file: Path, data: bytes) -> str:
    """`csv` by suffix; `mbox` for a `.mbox` file or several mbox envelopes; else `eml`."""
    if file.suffix.lower() == ".csv":
        return "csv"
    if file.suffix.lower() == ".mbox" or len(split_mbox(data)) > 1:
        return "mbox"
    return "eml"


def split_mbox(data: bytes) -> list[bytes]:
    """The messages of an mbox file, without their envelope lines.

    A message starts at a `From ` line shaped like an envelope (sender, then an asctime
    date) at the top of the file or after a blank line. Any other `From ` line is body
    text: pipermail archives leave some unescaped, and `mailbox.mbox` would split there.
    Text before the first envelope is not a message and is ignored.
    """
    messages: list[list[bytes]] = []
    blank_before = True
    for line in data.splitlines(keepends=True):
        if blank_before and _ENVELOPE.match(line):
            messages.append([])
        elif messages:
            messages[-1].append(line)
        blank_before = not line.strip()
    return [b"".join(lines) for lines in messages]


def _read_mbox(
    source: SourceConfig, file: Path, data: bytes, ident: str
) -> Iterator[RawMessage | Skipped]:
    label = _label(source, file)
    messages = split_mbox(data)
    if not messages:
        yield Skipped(ident, source.name, "not an mbox file: no `From ` envelope line")
    for n, raw in enumerate(messages, start=1):
        yield RawMessage(f"{ident}#{n}", source.name, label, raw, file)


def _label(source: SourceConfig, path: Path) -> str:
    if source.label is None:
        raise DataSourceError(
            f"source {source.name!r}: {path} is not a CSV file, so the source needs a label"
        )
    return source.label


def _read_maildir(source: SourceConfig, top: Path, base: Path) -> Iterator[RawMessage | Skipped]:
    label = _label(source, top)
    folders = [top, *sorted(p for p in top.rglob("*") if p.is_dir() and _is_maildir(p))]
    for folder in folders:
        for sub in ("cur", "new"):
            if not (folder / sub).is_dir():
                continue
            for file in sorted((folder / sub).iterdir()):
                if file.name.startswith(".") or file.is_dir():
                    continue
                ident = f"{source.name}:{_rel(file, base)}"
                try:
                    data = file.read_bytes()
                except OSError as exc:
                    yield Skipped(ident, source.name, f"unreadable file: {exc.strerror}")
                    continue
                yield RawMessage(ident, source.name, label, data, file)


def _read_csv(
    source: SourceConfig, file: Path, data: bytes, ident: str, labels: Sequence[str]
) -> Iterator[RawMessage | Skipped]:
    text = data.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise DataSourceError(f"source {source.name!r}: {file} is an empty CSV file") from None
    needed = [c for c in CSV_COLUMNS if not (c == "label" and source.label is not None)]
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataSourceError(
            f"source {source.name!r}: {file} lacks CSV column(s) {', '.join(missing)} "
            f"(has: {', '.join(header) or 'none'})"
        )
    col = {c: header.index(c) for c in CSV_COLUMNS if c in header}
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            where = f"source {source.name!r}: {file}:{start}"
            raise DataSourceError(f"{where}: bad CSV: {exc}") from None
        row_id = f"{ident}:{start}"
        if not any(cell.strip() for cell in row):
            continue
        values = {c: row[i] if i < len(row) else "" for c, i in col.items()}
        if any(_has_surrogates(v) for v in values.values()):
            yield Skipped(row_id, source.name, "CSV row is not valid UTF-8")
            continue
        label = source.label or values["label"].strip().lower()
        if label not in labels:
            raise DataSourceError(
                f"source {source.name!r}: {file}:{start}: label {values['label']!r} is not one "
                f"of {', '.join(labels)}"
            )
        raw = message_from_fields(values["subject"], values["body"], values["sender"])
        yield RawMessage(row_id, source.name, label, raw, file)


def _has_surrogates(value: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in value)


def message_from_fields(subject: str, body: str, sender: str) -> bytes:
    """An RFC 822 message (UTF-8 text/plain) built from CSV fields, for the renderer."""
    msg = EmailMessage(policy=SMTP)
    if sender.strip():
        msg["From"] = " ".join(sender.split())
    msg["Subject"] = " ".join(subject.split())
    msg.set_content(body.replace("\r\n", "\n"), charset="utf-8")
    return msg.as_bytes()


@dataclass(frozen=True)
class ManifestCheck:
    """A source's file count against the manifest next to it (cross-check, never fatal)."""

    manifest: str
    expected: int
    found: int
    missing: tuple[str, ...]
    unlisted: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.expected == self.found and not self.missing and not self.unlisted


def check_manifest(source: SourceConfig, root: Path, files: Sequence[Path]) -> ManifestCheck | None:
    """Compare the files read for `source` with a `manifest.csv`/`MANIFEST.tsv` found in
    the source folder or its parent; None where there is none.

    Rows with `status` other than `present` are ignored. When some rows' `path` lies in
    the source folder only those rows count and missing/unlisted names are listed (up to
    5 each); otherwise all rows count and only the totals are compared.
    """
    base, _ = resolve_path(source, root)
    found = next(
        (f / n for f in (base, base.parent) for n in MANIFEST_NAMES if (f / n).is_file()), None
    )
    if found is None:
        return None
    delimiter = "\t" if found.suffix == ".tsv" else ","
    with found.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter=delimiter))
    rows = [r for r in rows if r.get("status", "present") == "present"]
    top = base.resolve()
    paths = [(found.parent / r["path"]).resolve() for r in rows if r.get("path")]
    listed = {p for p in paths if p.is_relative_to(top)}
    read = {f.resolve() for f in files}
    if listed:
        missing = sorted(_rel(p, top) for p in listed - read)
        unlisted = sorted(_rel(p, top) for p in read - listed)
        expected = len(listed)
    else:
        missing, unlisted, expected = [], [], len(rows)
    return ManifestCheck(
        manifest=str(found),
        expected=expected,
        found=len(read),
        missing=tuple(missing[:5]),
        unlisted=tuple(unlisted[:5]),
    )
