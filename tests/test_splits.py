"""Leak-free splits: dedupe, campaign grouping, seeded stratified assignment, holdout."""

from __future__ import annotations

import hashlib
import random

import pytest

from phishgate.training.splits import (
    HOLDOUT,
    Item,
    assign_groups,
    campaign_groups,
    dedupe_exact,
    near_duplicate_pairs,
    plan_splits,
    subject_template,
)

_WORDS_TEXT = (
    "account invoice meeting report project server update review budget team lunch travel "
    "schedule release notes library function error install package version garden weather "
    "holiday family photo concert ticket train station coffee bread"
)
WORDS = _WORDS_TEXT.split()


def _text(rng: random.Random, n: int = 120) -> str:
    return " ".join(
        rng.choice(WORDS) + str(rng.randrange(1000)) * (rng.random() < 0.1) for _ in range(n)
    )


def _item(
    i: int,
    text: str,
    *,
    label: str = "legitimate",
    source: str = "src",
    domain: str | None = None,
    subject: str | None = None,
    raw: str | None = None,
) -> Item:
    raw_bytes = (raw or f"raw-{i}-{text}").encode()
    return Item(
        id=f"{source}:{i:04d}",
        source=source,
        label=label,
        raw_sha256=hashlib.sha256(raw_bytes).hexdigest(),
        text=text,
        sender_domain=domain if domain is not None else f"d{i}.example",
        subject=subject if subject is not None else f"subject {WORDS[i % len(WORDS)]} {i}x",
    )


def _corpus(n: int = 200, seed: int = 1) -> list[Item]:
    rng = random.Random(seed)
    return [
        _item(i, _text(rng), label="phishing" if i % 3 == 0 else "legitimate", source=f"s{i % 4}")
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("subject", "template"),
    [
        ("Re: Order 1234 shipped", "order # shipped"),
        ("Fwd: RE: order 98-77 shipped", "order # shipped"),
        ("AW: Ihre Rechnung Nr. A7F3C2D9E1", "ihre rechnung nr. #"),
        ("[USRP-users] Re: B210 timing", "[usrp-users] # timing"),
        ("Hello bob@example.com, see https://x.example/a?b=1", "hello # see #"),
        ("   ", ""),
    ],
)
def test_subject_template_strips_prefixes_and_masks_ids(subject: str, template: str) -> None:
    assert subject_template(subject) == template


def test_exact_duplicates_by_raw_bytes_and_by_rendered_text_keep_the_first() -> None:
    a = _item(0, "same words here", raw="raw A")
    b = _item(1, "other words entirely", raw="raw A")  # same raw bytes
    c = _item(2, "same words here", raw="raw C")  # same rendered text
    d = _item(3, "fresh text", raw="raw D")
    kept, removed = dedupe_exact([a, b, c, d])
    assert [k.id for k in kept] == [a.id, d.id]
    assert [(r.id, r.kind, r.other) for r in removed] == [
        (b.id, "exact-raw", a.id),
        (c.id, "exact-text", a.id),
    ]


def test_near_duplicates_found_only_above_the_threshold() -> None:
    rng = random.Random(7)
    base = _text(rng, 150).split()
    variant = list(base)
    variant[40] = "Dear-Mallory"
    variant[90] = "4711"
    unrelated = _text(rng, 150)
    pairs = near_duplicate_pairs([" ".join(base), " ".join(variant), unrelated, ""], 0.8)
    assert pairs == [(0, 1)]


def test_groups_join_near_duplicates_and_same_domain_with_same_subject_template() -> None:
    rng = random.Random(3)
    items = [
        _item(0, _text(rng), domain="news.shop.example", subject="Newsletter 12/2023"),
        _item(1, _text(rng), domain="news.shop.example", subject="Newsletter 01/2024"),
        _item(2, _text(rng), domain="other.example", subject="Newsletter 12/2023"),
        _item(3, _text(rng), domain="news.shop.example", subject=""),
        _item(4, _text(rng), domain="", subject="Newsletter 12/2023"),
    ]
    groups = campaign_groups(items, near_pairs=[(3, 4)])
    assert sorted(groups) == [[0, 1], [2], [3, 4]]


def test_same_seed_same_splits_other_seed_differs() -> None:
    items = _corpus()
    first = plan_splits(items, seed=13)
    again = plan_splits(list(items), seed=13)
    other = plan_splits(items, seed=14)
    assert first == again
    assert first.assignment != other.assignment
    assert set(first.assignment) == {i.id for i in items}


def test_fractions_are_approximately_met_and_stratified_by_label() -> None:
    items = _corpus(600)
    plan = plan_splits(items, seed=0)
    labels = {i.id: i.label for i in items}
    for label in ("phishing", "legitimate"):
        n = sum(1 for lab in labels.values() if lab == label)
        counts = {
            s: sum(1 for i in plan.ids(s) if labels[i] == label) for s in ("train", "dev", "test")
        }
        assert abs(counts["train"] / n - 0.8) < 0.02
        assert abs(counts["dev"] / n - 0.1) < 0.02
        assert abs(counts["test"] / n - 0.1) < 0.02


def test_template_variants_with_other_names_and_numbers_land_on_one_side() -> None:
    rng = random.Random(5)
    template = _text(rng, 140).split()
    campaign = []
    for k, name in enumerate(["Alice", "Bob", "Carol", "Dave", "Erin", "Frank"]):
        words = list(template)
        words[3], words[70] = f"Dear {name}", f"case {1000 + 37 * k}"
        # Different sender domains and subjects: only the text links them.
        campaign.append(
            _item(
                1000 + k,
                " ".join(words),
                label="phishing",
                domain=f"x{k}.example",
                subject=f"{name}, act now",
            )
        )
    items = _corpus(300) + campaign
    campaign_ids = {c.id for c in campaign}
    for seed in range(4):
        plan = plan_splits(items, seed=seed, drop_near_duplicates=False)
        assert {plan.assignment[i] for i in campaign_ids} == {plan.assignment[campaign[0].id]}
        dropped = plan_splits(items, seed=seed, drop_near_duplicates=True)
        assert [i for i in campaign_ids if i in dropped.assignment] == [campaign[0].id]
        assert {(r.kind, r.other) for r in dropped.removed} == {("near", campaign[0].id)}


def test_newsletter_pair_sharing_domain_and_template_lands_on_one_side() -> None:
    rng = random.Random(9)
    pair = [
        _item(2000, _text(rng), domain="mail.ngo.example", subject="Newsletter Januar 2023"),
        _item(2001, _text(rng), domain="mail.ngo.example", subject="Newsletter Februar 2023"),
        _item(2002, _text(rng), domain="MAIL.NGO.EXAMPLE", subject="Re: newsletter Januar 2024"),
    ]
    items = _corpus(300) + pair
    for seed in range(4):
        plan = plan_splits(items, seed=seed)
        assert plan.assignment[pair[0].id] == plan.assignment[pair[2].id]
        assert any(set(g) >= {pair[0].id, pair[2].id} for g in plan.groups)


def test_holdout_source_never_in_train_dev_test_and_its_campaigns_are_removed() -> None:
    rng = random.Random(11)
    items = _corpus(200)
    shared = _text(rng, 100)
    items.append(_item(3000, shared, source="held/a", domain="camp.example", subject="Win 1"))
    items.append(
        _item(3001, shared + " extra", source="s0", domain="camp.example", subject="Win 2")
    )
    items.append(_item(3002, _text(rng), source="held/b"))
    plan = plan_splits(items, seed=0, holdout_sources=["held"], drop_near_duplicates=False)
    held = {i.id for i in items if i.source.startswith("held/")}
    assert set(plan.ids(HOLDOUT)) == held
    for split in ("train", "dev", "test"):
        assert not held & set(plan.ids(split))
    assert ("s0:3001", "holdout-campaign", "held/a:3000") in {
        (r.id, r.kind, r.other) for r in plan.removed
    }


def test_groups_are_never_split_and_mixed_label_groups_follow_the_majority() -> None:
    items = [
        _item(
            i,
            f"text number {i} " * 5,
            label="phishing" if i < 2 else "legitimate",
            domain="same.example",
            subject="Your parcel",
        )
        for i in range(5)
    ]
    splits = assign_groups([items], {"train": 0.8, "dev": 0.1, "test": 0.1}, seed=0)
    assert splits == ["train"]
