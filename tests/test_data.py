"""Ingest and prepare: config, readers, bad input, and the prepared dataset on disk."""

from __future__ import annotations

import hashlib
import json
import mailbox
import random
from pathlib import Path
from typing import Any

import pytest

from phishgate.core.errors import ConfigError
from phishgate.core.settings import CoreSettings
from phishgate.core.tasks import get_task
from phishgate.training import data as data_module
from phishgate.training.data import prepare_dataset, render_message
from phishgate.training.sources import (
    DEFAULT_CONFIG,
    DataConfig,
    DataSourceError,
    RawMessage,
    Skipped,
    SourceConfig,
    check_manifest,
    detect_format,
    load_data_config,
    parse_source_override,
    read_source,
)

LABELS = ("legitimate", "phishing")
_VOCAB_TEXT = (
    "meeting invoice garden release server holiday library budget concert ticket weather "
    "package version report coffee station family photo project schedule travel lunch "
    "review update account password verify bank urgent login prize claim"
)
VOCAB = _VOCAB_TEXT.split()


def _eml(subject: str, body: str, sender: str = "Alice <alice@mail.example>") -> bytes:
    return (
        f"From: {sender}\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
        f"Date: Mon, 2 Jan 2023 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


def _words(rng: random.Random, n: int = 80) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def _source(
    name: str, path: Path | str, fmt: str = "auto", label: str | None = "legitimate"
) -> SourceConfig:
    return SourceConfig.model_validate(
        {"name": name, "path": str(path), "format": fmt, "label": label}
    )


def _read(source: SourceConfig, root: Path) -> list[RawMessage | Skipped]:
    return list(read_source(source, root, LABELS))


def _make_corpus(root: Path, n: int = 60, seed: int = 0) -> None:
    """ham in nested .eml folders and a maildir; phishing in an mbox and single files."""
    rng = random.Random(seed)
    for i in range(n):
        sub = "a" if i % 2 else "b/c"
        _write(
            root / "ham" / sub / f"{i:03d}.eml",
            _eml(
                f"{rng.choice(VOCAB)} {rng.choice(VOCAB)} notes {i}",
                _words(rng),
                sender=f"User {i} <u{i}@d{i % 7}.example>",
            ),
        )
    box = mailbox.mbox(root / "phish.mbox")
    for i in range(n):
        body = _words(rng) + f"\nhttp://login-{i}.bad.example/verify"
        box.add(_eml(f"Security alert {rng.choice(VOCAB)} {i}", body, f"Bank <no@p{i}.example>"))
    box.flush()
    box.close()


# ---------------------------------------------------------------- config


def test_default_config_covers_every_shared_source_per_task() -> None:
    phishing = load_data_config(DEFAULT_CONFIG)
    spam = load_data_config(DEFAULT_CONFIG, task="spam")
    names = {s.name for s in phishing.sources}
    assert "phishing_pot" in names and "modern_ham/r-mailing-lists" in names
    assert len([n for n in names if n.startswith("modern_ham/")]) == 8
    phishing_labels = {s.name: s.label for s in phishing.active_sources()}
    assert "spamassassin/spam-1" not in phishing_labels  # spam is not phishing
    assert phishing_labels["phishing_pot"] == "phishing"
    spam_labels = {s.name: s.label for s in spam.active_sources()}
    assert "phishing_pot" not in spam_labels
    assert spam_labels["spamassassin/spam-2"] == "spam"
    assert phishing.data_root == (DEFAULT_CONFIG.parent / "../../../../shared/data").resolve()


def _config_file(tmp_path: Path, text: str) -> Path:
    return _write(tmp_path / "data.yaml", text)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (
            "sources: [{name: a, path: x, label: legitimate, colour: red}]",
            "sources.0.colour: Extra inputs are not permitted",
        ),
        ("sources: [{name: a, path: x, label: legitimate}]\nseeed: 1", "seeed: Extra inputs"),
        (
            "sources: [{name: a, path: x, label: legitimate, format: pst}]",
            "sources.0.format: Input should be 'eml', 'maildir', 'mbox', 'csv' or 'auto'",
        ),
        (
            "sources: [{name: a, path: x, label: spam}]",
            "source 'a': label 'spam' is not a label of task 'phishing' (legitimate, phishing)",
        ),
        (
            "sources: [{name: a, path: x, format: eml}]",
            "sources.0: label is required unless format is csv or auto",
        ),
        ("task: fraud\nsources: [{name: a, path: x, label: x}]", "task: unknown task 'fraud'"),
        (
            "sources: [{name: a, path: x, label: legitimate}, {name: a, path: y, label: phishing}]",
            "duplicate source names: a",
        ),
        (
            "holdout_sources: [b]\nsources: [{name: a, path: x, label: legitimate}]",
            "holdout source 'b' names no source of this task",
        ),
        (
            "split: {train: 0.8, dev: 0.3, test: 0.1}\n"
            "sources: [{name: a, path: x, label: legitimate}]",
            "split: fractions must be >= 0 and sum to 1",
        ),
        ("- just a list", "expected a mapping at the top level"),
    ],
)
def test_bad_configs_are_rejected_naming_the_field(
    tmp_path: Path, yaml_text: str, message: str
) -> None:
    path = _config_file(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as caught:
        load_data_config(path)
    assert str(caught.value).startswith(f"data config {path}")
    assert message in str(caught.value)


def test_relative_paths_resolve_against_the_config_folder_or_data_root(tmp_path: Path) -> None:
    path = _config_file(
        tmp_path, "data_root: corpora\nsources: [{name: a, path: x, label: phishing}]"
    )
    assert load_data_config(path).data_root == tmp_path / "corpora"
    assert load_data_config(path, data_root=Path("/elsewhere")).data_root == Path("/elsewhere")


def test_source_override_parses_and_replaces_or_adds(tmp_path: Path) -> None:
    spec = parse_source_override("mine=/mail/Maildir:phishing")
    assert (spec.name, spec.path, spec.label, spec.format) == (
        "mine",
        "/mail/Maildir",
        "phishing",
        "auto",
    )
    with_colon = parse_source_override("x=/srv/a:b.csv:legitimate:csv")
    assert (with_colon.path, with_colon.format) == ("/srv/a:b.csv", "csv")
    for bad in ("nolabel=/x", "=/x:phishing", "x/:y:phishing", "x=/p:"):
        with pytest.raises(ConfigError, match="--source"):
            parse_source_override(bad)
    path = _config_file(tmp_path, "sources: [{name: a, path: x, label: legitimate}]")
    config = load_data_config(
        path, sources=[parse_source_override("a=y:phishing"), parse_source_override("b=z:phishing")]
    )
    assert [(s.name, s.path, s.label) for s in config.sources] == [
        ("a", str(Path.cwd() / "y"), "phishing"),
        ("b", str(Path.cwd() / "z"), "phishing"),
    ]


# ---------------------------------------------------------------- readers


def test_eml_folder_is_read_recursively_with_file_bytes_verbatim(tmp_path: Path) -> None:
    _write(tmp_path / "mail" / "x" / "1.eml", _eml("one", "first"))
    single = b"From someone@x.example  Thu Aug 22 12:36:23 2002\n" + _eml("two", "second")
    _write(tmp_path / "mail" / "2.txt", single)  # SpamAssassin style: envelope line first
    _write(tmp_path / "mail" / ".hidden" / "3.eml", _eml("three", "hidden"))
    out = _read(_source("s", "mail", "eml"), tmp_path)
    assert [(m.id, m.raw) for m in out if isinstance(m, RawMessage)] == [
        ("s:2.txt", single),
        ("s:x/1.eml", _eml("one", "first")),
    ]
    assert [m.id for m in _read(_source("s", "mail"), tmp_path)] == ["s:2.txt", "s:x/1.eml"]


def test_maildir_reads_cur_and_new_of_each_folder(tmp_path: Path) -> None:
    box = mailbox.Maildir(tmp_path / "Maildir")
    box.add(_eml("a", "in new"))
    sub = box.add_folder("Sent")
    sub.add(_eml("b", "in sent"))
    _write(tmp_path / "Maildir" / "cur" / "123.host:2,S", _eml("c", "in cur"))
    _write(tmp_path / "Maildir" / "tmp" / "999.host", _eml("d", "still being delivered"))
    for fmt in ("maildir", "auto"):
        out = _read(_source("md", "Maildir", fmt), tmp_path)
        bodies = sorted(
            m.raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1].strip()
            for m in out
            if isinstance(m, RawMessage)
        )
        assert bodies == [b"in cur", b"in new", b"in sent"]


def test_mbox_files_and_pipermail_archives(tmp_path: Path) -> None:
    pipermail = (
        "From r.user at example.org  Sun Jun  1 00:08:19 2014\n"
        "From: r.user at example.org (R User)\nDate: Sun, 1 Jun 2014 10:08:19 +1200\n"
        "Subject: [R] plots\nMessage-ID: <1@example.org>\n\nHow do I plot?\n\n"
        "From the docs: a body line pipermail left unescaped.\n\n"
        "From other at example.net  Sun Jun  1 01:00:00 2014\n"
        "From: other at example.net (Other)\nDate: Sun, 1 Jun 2014 11:00:00 +1200\n"
        "Subject: Re: [R] plots\nMessage-ID: <2@example.org>\n\nUse plot().\n"
    )
    _write(tmp_path / "lists" / "2014-June.txt", pipermail)
    out = _read(_source("r", "lists/*.txt", "mbox"), tmp_path)
    assert [m.id for m in out] == ["r:2014-June.txt#1", "r:2014-June.txt#2"]
    first = out[0]
    assert isinstance(first, RawMessage)
    assert first.raw.startswith(b"From: r.user at example.org (R User)\n")
    assert first.raw.endswith(b"From the docs: a body line pipermail left unescaped.\n\n")
    auto = _read(_source("r", "lists", "auto"), tmp_path)
    assert [m.id for m in auto] == ["r:2014-June.txt#1", "r:2014-June.txt#2"]
    data = (tmp_path / "lists" / "2014-June.txt").read_bytes()
    assert detect_format(Path("2014-June.txt"), data) == "mbox"
    single = b"From a@b.example  Thu Aug 22 12:36:23 2002\n" + _eml("s", "From here on\n")
    assert detect_format(Path("00001.txt"), single) == "eml"
    _write(tmp_path / "notmbox" / "a.mbox", "just text\n")
    assert _read(_source("n", "notmbox", "mbox"), tmp_path) == [
        Skipped("n:a.mbox", "n", "not an mbox file: no `From ` envelope line")
    ]


def test_csv_rows_become_rfc822_messages(tmp_path: Path) -> None:
    _write(
        tmp_path / "rows.csv",
        "subject,body,sender,label\n"
        'Hello,"Line one\nLine two",Ann <ann@x.example>,legitimate\n'
        "Verify now,Your account is locked,security@bank.example,Phishing\n"
        ",,,\n"
        "Größe,Ümlaut body,,legitimate\n",
    )
    out = _read(_source("csv", "rows.csv", "auto", label=None), tmp_path)
    assert [(m.id, m.label) for m in out if isinstance(m, RawMessage)] == [
        ("csv:rows.csv:2", "legitimate"),
        ("csv:rows.csv:4", "phishing"),
        ("csv:rows.csv:6", "legitimate"),
    ]
    first = out[0]
    assert isinstance(first, RawMessage)
    assert b"From: Ann <ann@x.example>" in first.raw and b"Subject: Hello" in first.raw
    assert b"Line one\r\nLine two" in first.raw


def test_a_source_without_label_may_only_hold_csv_files(tmp_path: Path) -> None:
    path = _write(tmp_path / "mixed" / "a.eml", _eml("a", "b"))
    with pytest.raises(DataSourceError) as caught:
        _read(_source("m", "mixed", "auto", label=None), tmp_path)
    assert str(caught.value) == (
        f"source 'm': {path} is not a CSV file, so the source needs a label"
    )


def test_csv_missing_columns_names_file_and_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "rows.csv", "subject,text,label\nhi,there,phishing\n")
    with pytest.raises(DataSourceError) as caught:
        _read(_source("c", "rows.csv", "csv", label=None), tmp_path)
    assert str(caught.value) == (
        f"source 'c': {path} lacks CSV column(s) body, sender (has: subject, text, label)"
    )


def test_csv_label_outside_the_label_set_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "rows.csv", "subject,body,sender,label\na,b,c,phishing\nd,e,f,spam\n")
    with pytest.raises(DataSourceError) as caught:
        _read(_source("c", "rows.csv", "csv", label=None), tmp_path)
    assert str(caught.value) == (
        f"source 'c': {path}:3: label 'spam' is not one of legitimate, phishing"
    )


def test_csv_row_in_another_encoding_is_skipped_not_decoded_wrongly(tmp_path: Path) -> None:
    data = b"subject,body,sender,label\nok,fine,a@x.example,legitimate\n"
    data += "latin,caf\u00e9,b@x.example,legitimate\n".encode("latin-1")
    _write(tmp_path / "rows.csv", data)
    out = _read(_source("c", "rows.csv", "csv", label=None), tmp_path)
    assert [type(m).__name__ for m in out] == ["RawMessage", "Skipped"]
    assert out[1] == Skipped("c:rows.csv:3", "c", "CSV row is not valid UTF-8")


def test_empty_source_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError) as caught:
        _read(_source("nothing", "empty"), tmp_path)
    assert str(caught.value) == "source 'nothing' is empty: no messages under 'empty'"
    with pytest.raises(DataSourceError) as caught:
        _read(_source("gone", "missing/*.eml"), tmp_path)
    assert str(caught.value) == "source 'gone' is empty: 'missing/*.eml' matches nothing"


def test_unreadable_file_is_yielded_as_skipped(tmp_path: Path) -> None:
    _write(tmp_path / "mail" / "ok.eml", _eml("ok", "fine"))
    (tmp_path / "mail" / "broken.eml").symlink_to(tmp_path / "nowhere.eml")
    out = _read(_source("s", "mail", "eml"), tmp_path)
    assert out[0] == Skipped("s:broken.eml", "s", "unreadable file: No such file or directory")
    assert isinstance(out[1], RawMessage)


def test_manifest_cross_check_reports_counts(tmp_path: Path) -> None:
    for i in range(3):
        _write(tmp_path / "corpus" / "email" / f"{i}.eml", _eml(str(i), "x"))
    rows = ["path,label", *(f"email/{i}.eml,phishing" for i in (0, 1, 5))]
    _write(tmp_path / "corpus" / "manifest.csv", "\n".join(rows) + "\n")
    source = _source("c", "corpus/email", "eml", "phishing")
    files = [m.file for m in _read(source, tmp_path) if isinstance(m, RawMessage)]
    check = check_manifest(source, tmp_path, files)
    assert check is not None and not check.ok
    assert (check.expected, check.found, check.missing, check.unlisted) == (
        3,
        3,
        ("5.eml",),
        ("2.eml",),
    )


# ---------------------------------------------------------------- prepare


def _config(root: Path, **extra: Any) -> DataConfig:
    sources = [
        {"name": "corp/ham", "path": "ham", "format": "eml", "label": "legitimate"},
        {"name": "corp/phish", "path": "phish.mbox", "format": "mbox", "label": "phishing"},
        {"name": "extra", "path": "extra", "format": "auto", "label": "legitimate"},
    ]
    return DataConfig.model_validate({"data_root": root, "sources": sources, **extra})


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_prepare_writes_splits_and_card(tmp_path: Path, tokenizer: Any) -> None:
    data = tmp_path / "data"
    _make_corpus(data)
    _write(data / "extra" / "empty.eml", b"")
    _write(data / "extra" / "dup.eml", (data / "ham" / "a" / "001.eml").read_bytes())
    latin1 = "caf\xe9 in latin-1\n".encode("latin-1")
    _write(data / "extra" / "mixed.eml", _eml("Caf\u00e9", "na\u00efve utf-8") + latin1)
    settings = CoreSettings(home=tmp_path / "var", max_input_tokens=256)
    prepared = prepare_dataset(_config(data), settings, tokenizer, progress=False)

    out = tmp_path / "var" / "data" / "phishing"
    assert prepared.out_dir == out
    assert sorted(p.name for p in out.iterdir()) == [
        "card.json",
        "card.md",
        "dev.jsonl",
        "test.jsonl",
        "train.jsonl",
    ]
    card = json.loads((out / "card.json").read_text())
    seen: set[str] = set()
    for split in ("train", "dev", "test"):
        lines = _lines(out / f"{split}.jsonl")
        assert card["splits"][split]["count"] == len(lines)
        digest = hashlib.sha256((out / f"{split}.jsonl").read_bytes()).hexdigest()
        assert card["splits"][split]["sha256"] == digest
        for line in lines:
            assert list(line) == [
                "id",
                "source",
                "label",
                "sha256",
                "n_tokens",
                "truncated",
                "lang",
                "messages",
            ]
            assert [m["role"] for m in line["messages"]] == ["system", "user", "assistant"]
            assert line["messages"][2]["content"] == line["label"]
            assert 0 < line["n_tokens"] <= 256
            seen.add(line["id"])
    assert card["splits"]["train"]["labels"]["phishing"] > 0
    # Nothing silently dropped: every message read is in a split, removed or skipped.
    assert (
        card["totals"]["read"] == len(seen) + card["totals"]["removed"] + card["totals"]["skipped"]
    )
    assert card["totals"]["read"] == 123
    assert card["duplicates"]["exact_raw"] == 1
    assert card["skipped"] == [
        {
            "reason": "rejected by the renderer: empty message",
            "count": 1,
            "sources": {"extra": 1},
            "examples": ["extra:empty.eml"],
        }
    ]
    assert card["sources"]["extra"] == {
        "label": "legitimate",
        "note": "",
        "read": 3,
        "rendered": 2,
        "skipped": 1,
        "manifest": None,
    }  # mixed.eml (UTF-8 and Latin-1 in one body) is rendered, not dropped
    assert card["prompt_version"] and card["config"]["seed"] == 0
    assert card["languages"]["legitimate"][0][0] == "en"
    assert "## Splits" in (out / "card.md").read_text()


def test_prepare_is_deterministic_for_a_seed_and_holds_out_sources(
    tmp_path: Path, tokenizer: Any
) -> None:
    data = tmp_path / "data"
    _make_corpus(data, n=40)
    _write(data / "extra" / "x.eml", _eml("unrelated", "a different message entirely"))
    settings = CoreSettings(home=tmp_path / "var", max_input_tokens=128)

    def hashes(out: str, **extra: Any) -> dict[str, str]:
        prepared = prepare_dataset(
            _config(data, **extra), settings, tokenizer, out_dir=tmp_path / out, progress=False
        )
        return {k: v["sha256"] for k, v in prepared.card["splits"].items()}

    first, again, other = hashes("a"), hashes("b"), hashes("c", seed=1)
    assert first == again
    assert first != other
    held = prepare_dataset(
        _config(data, holdout_sources=["corp"]),
        settings,
        tokenizer,
        out_dir=tmp_path / "h",
        progress=False,
    )
    holdout = _lines(tmp_path / "h" / "holdout.jsonl")
    assert {line["source"] for line in holdout} == {"corp/ham", "corp/phish"}
    for split in ("train", "dev", "test"):
        assert {line["source"] for line in _lines(tmp_path / "h" / f"{split}.jsonl")} <= {"extra"}
    assert any(w == "train has no 'phishing' example" for w in held.card["warnings"])


def test_renderer_bugs_are_skipped_with_a_reason_but_config_errors_stop_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = RawMessage("s:1.eml", "s", "phishing", _eml("a", "b"), Path("1.eml"))
    task = get_task("phishing")

    def crash(raw: bytes) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(data_module, "parse_email", crash)
    assert render_message(message, task, None, 256) == Skipped(
        "s:1.eml", "s", "renderer bug: RuntimeError: boom"
    )

    def refuse(raw: bytes) -> None:
        raise ConfigError("the tokenizer has no chat template")

    monkeypatch.setattr(data_module, "parse_email", refuse)
    with pytest.raises(ConfigError, match="no chat template"):
        render_message(message, task, None, 256)


@pytest.mark.slow
def test_prepare_on_a_sample_of_the_shared_corpora(
    tmp_path: Path, tokenizer: Any, shared_data: Path
) -> None:
    config = load_data_config(DEFAULT_CONFIG, data_root=shared_data, max_per_source=30)
    settings = CoreSettings(home=tmp_path, max_input_tokens=512)
    prepared = prepare_dataset(config, settings, tokenizer, progress=False)
    card = prepared.card
    assert set(card["sources"]) == {s.name for s in config.active_sources()}
    for name, source in card["sources"].items():
        assert source["read"] == min(30, source["read"]) > 0, name
    total = sum(card["splits"][s]["count"] for s in ("train", "dev", "test"))
    assert total + card["totals"]["removed"] + card["totals"]["skipped"] == card["totals"]["read"]
    assert card["splits"]["test"]["labels"]["phishing"] > 0
