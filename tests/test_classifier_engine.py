"""The transformers + PEFT engine: mixed-adapter batches score like one adapter at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from phishgate.core.tasks import get_task
from tests.conftest import LEGITIMATE_TEMPLATES, PHISHING_TEMPLATES, synthetic_email

pytestmark = pytest.mark.slow


def _emails(tokenizer: Any, n: int) -> list[Any]:
    from phishgate.core.render import render_email

    task = get_task("phishing")
    out = []
    for i in range(n):
        templates = PHISHING_TEMPLATES if i % 2 else LEGITIMATE_TEMPLATES
        sender, subject, body = (part.format(n=100 + i) for part in templates[i % 2])
        body = body + " More text." * (i * 3)  # different lengths: real left padding
        out.append(render_email(synthetic_email(sender, subject, body), task, tokenizer, 256))
    return out


def test_a_mixed_batch_scores_each_row_as_its_adapter_alone(
    prepared_model: Any, tokenizer: Any, trained_adapters: tuple[Path, Path]
) -> None:
    from peft import PeftModel

    from phishgate.classifier.engine import EngineRow
    from phishgate.classifier.engine_transformers import TransformersEngine
    from phishgate.core.model import load_causal_lm
    from phishgate.core.scoring import TransformersScorer, prompt_prefix_ids

    task = get_task("phishing")
    first, second = trained_adapters
    engine = TransformersEngine(
        prepared_model.path,
        pad_id=tokenizer.pad_token_id,
        prefixes=[prompt_prefix_ids(tokenizer, t) for t in (task, get_task("spam"))],
    )
    engine.load_adapter("phishing@1", first)
    engine.load_adapter("phishing@2", second)
    assert engine.adapter_keys() == {"phishing@1", "phishing@2"}

    emails = _emails(tokenizer, 6)
    keys = ["phishing@1", "phishing@2", None, "phishing@2", "phishing@1", None]
    scorer_ids = TransformersScorer(load_causal_lm(prepared_model.path), tokenizer, task).label_ids
    rows = [EngineRow(e.prompt_ids, scorer_ids, k) for e, k in zip(emails, keys, strict=True)]
    mixed = engine.score(rows)

    expected: dict[str | None, list[float]] = {}
    for key, folder in (("phishing@1", first), ("phishing@2", second), (None, None)):
        model = load_causal_lm(prepared_model.path)
        if folder is not None:
            model = PeftModel.from_pretrained(model, str(folder)).eval()
        scorer = TransformersScorer(model, tokenizer, task, max_batch_size=1)
        chosen = [e for e, k in zip(emails, keys, strict=True) if k == key]
        expected[key] = [s.score for s in scorer.score_batch(chosen)]
    alone = {key: iter(values) for key, values in expected.items()}
    for row, probabilities in zip(rows, mixed, strict=True):
        assert len(probabilities) == 2 and sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert probabilities[1] == pytest.approx(next(alone[row.adapter_key]), abs=1e-4)
    # A batch of one adapter, or of base-model rows only, runs without per-row routing
    # and must score the same; a mixed batch afterwards still routes every row.
    for key in ("phishing@1", "phishing@2", None):
        same = [row for row in rows if row.adapter_key == key]
        assert [p[1] for p in engine.score(same)] == pytest.approx(expected[key], abs=1e-4)
    again = [p[1] for p in engine.score(rows)]
    assert again == pytest.approx([p[1] for p in mixed], abs=1e-5)
    # The adapters really differ from each other and from the base model.
    assert abs(expected["phishing@1"][0] - expected[None][0]) > 1e-3
    assert mixed[0] != pytest.approx(
        engine.score([EngineRow(rows[0].prompt_ids, scorer_ids, "phishing@2")])[0], abs=1e-4
    )

    engine.unload_adapter("phishing@1")
    with pytest.raises(KeyError):
        engine.score([rows[0]])
    with pytest.raises(KeyError):
        engine.unload_adapter("phishing@1")
    engine.unload_adapter("phishing@2")  # the last one: back to the bare base model
    assert engine.adapter_keys() == frozenset()
    base_alone = engine.score([rows[2]])[0][1]
    assert base_alone == pytest.approx(expected[None][0], abs=1e-4)
    engine.load_adapter("phishing@2", second)  # and adapters load again afterwards
    assert engine.score([rows[1]])[0][1] == pytest.approx(expected["phishing@2"][0], abs=1e-4)
    engine.close()


def test_a_compiled_engine_scores_like_eager_and_compiles_only_when_an_adapter_loads(
    prepared_model: Any, tokenizer: Any, trained_adapters: tuple[Path, Path]
) -> None:
    from torch._dynamo.utils import counters

    from phishgate.classifier.engine import EngineRow
    from phishgate.classifier.engine_transformers import TransformersEngine
    from phishgate.core.scoring import label_token_ids, prompt_prefix_ids

    task = get_task("phishing")
    prefixes = [prompt_prefix_ids(tokenizer, task)]
    label_ids = label_token_ids(tokenizer, task)
    rows = [EngineRow(e.prompt_ids, label_ids, "phishing@1") for e in _emails(tokenizer, 3)]
    eager = TransformersEngine(
        prepared_model.path, pad_id=tokenizer.pad_token_id, prefixes=prefixes
    )
    eager.load_adapter("phishing@1", trained_adapters[0])
    expected = [p[1] for p in eager.score(rows)]
    eager.close()

    compiled = TransformersEngine(
        prepared_model.path, pad_id=tokenizer.pad_token_id, prefixes=prefixes, compile=True
    )
    graphs = counters["stats"]["unique_graphs"]
    compiled.load_adapter("phishing@1", trained_adapters[0])
    warmed = counters["stats"]["unique_graphs"]
    assert warmed > graphs  # loading compiled the adapter's graphs
    assert [p[1] for p in compiled.score(rows)] == pytest.approx(expected, abs=1e-4)
    assert compiled.score(rows[:1])[0][1] == pytest.approx(expected[0], abs=1e-4)
    assert counters["stats"]["unique_graphs"] == warmed  # requests ran the warmed graphs
    compiled.close()
