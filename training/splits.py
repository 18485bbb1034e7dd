"""Leak-free splits: deduplicate, group campaigns, assign whole groups to train/dev/test.

Pure functions, no I/O. The contract, in order:

1. Exact duplicates are removed: same sha256 of the raw bytes, then same sha256 of the
   rendered text. The first occurrence in input order is kept.
2. Near-duplicates are pairs whose rendered texts have an estimated Jaccard similarity of
   word shingles at or above a threshold (MinHash LSH, then checked on the signatures).
   They are either dropped (one representative per connected component is kept) or kept
   and grouped.
3. Campaign groups are connected components (union-find) of near-duplicate pairs and of
   messages sharing (sender domain, subject template).
4. Messages of holdout sources go to `holdout` only; the other members of a group that
   touches a holdout source are removed, so no campaign spans holdout and the rest.
5. Groups, never messages, go to train/dev/test: per label stratum (a group's majority
   label) groups are ordered by a seeded hash of their smallest id and cut at the
   cumulative fractions. The same input and seed give the same splits.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from datasketch import LeanMinHash, MinHash, MinHashLSH

SPLITS = ("train", "dev", "test")
HOLDOUT = "holdout"
DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.8, "dev": 0.1, "test": 0.1}
SHINGLE_WORDS = 3
NUM_PERM = 128
_TEMPLATE = MinHash(num_perm=NUM_PERM, seed=1)  # its permutations are reused (costly to draw)


@dataclass(frozen=True)
class Item:
    """What splitting needs to know about one rendered message."""

    id: str
    source: str
    label: str
    raw_sha256: str
    text: str
    sender_domain: str
    subject: str

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Removal:
    """A message left out of every split: `kind` says why, `other` is the id it yields to.

    kinds: `exact-raw`, `exact-text`, `near` (duplicates of `other`, which is kept) and
    `holdout-campaign` (shares a campaign group with holdout message `other`).
    """

    id: str
    kind: str
    other: str


@dataclass(frozen=True)
class SplitPlan:
    """Where every kept message goes, what was removed, and the campaign groups."""

    assignment: dict[str, str]
    removed: tuple[Removal, ...]
    groups: tuple[tuple[str, ...], ...]
    near_pairs: int

    def ids(self, split: str) -> list[str]:
        """Ids assigned to `split`, in input order."""
        return [i for i, s in self.assignment.items() if s == split]


def in_holdout(source: str, holdout_sources: Collection[str]) -> bool:
    """True if `source` is a holdout source or lies under one (`corpus` holds `corpus/x`)."""
    return any(source == h or source.startswith(h + "/") for h in holdout_sources)


_REPLY_PREFIX = re.compile(
    r"\b(?:re|fwd?|aw|wg|tr|enc|sv|vs|rv|antw|odp)\s*(?:\[\d+\])?\s*:", re.IGNORECASE
)
_EMAIL = re.compile(r"\S+@\S+")
_URL = re.compile(r"\b(?:https?://|www\.)\S+", re.IGNORECASE)
_HEX = re.compile(r"\b[0-9a-f]{8,}\b", re.IGNORECASE)
_ID_TOKEN = re.compile(r"\b\w*\d\w*\b")
_LONG_TOKEN = re.compile(r"\b\w{25,}\b")
_SPACE = re.compile(r"\s+")


def subject_template(subject: str) -> str:
    """The subject with reply/forward prefixes stripped and variable parts masked.

    Lowercased; addresses, URLs, hex strings, tokens containing a digit and very long
    tokens become `#`; whitespace collapsed. "Re: Order 1234 shipped" and
    "Fwd: order 98-77 shipped" share the template "order # shipped".
    """
    s = _REPLY_PREFIX.sub(" ", subject.lower())
    for pattern in (_EMAIL, _URL, _HEX, _ID_TOKEN, _LONG_TOKEN):
        s = pattern.sub("#", s)
    s = re.sub(r"#(?:[\W_]*#)+", "#", s)
    return _SPACE.sub(" ", s).strip(" \t-_:|")


def shingles(text: str, size: int = SHINGLE_WORDS) -> set[str]:
    """Word `size`-grams of the lowercased text, digits masked; one shingle if shorter."""
    words = [re.sub(r"\d", "0", w) for w in re.findall(r"\w+", text.lower())]
    if len(words) <= size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def minhash(text: str) -> LeanMinHash | None:
    """The MinHash signature of the text's shingles; None for a text without words."""
    grams = shingles(text)
    if not grams:
        return None
    m = MinHash(num_perm=NUM_PERM, permutations=_TEMPLATE.permutations, scheme=_TEMPLATE.scheme)
    m.update_batch([g.encode("utf-8") for g in sorted(grams)])
    return LeanMinHash(m)


def near_duplicate_pairs(texts: Sequence[str], threshold: float) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose estimated shingle Jaccard similarity is >= threshold."""
    signatures = [minhash(t) for t in texts]
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    for i, sig in enumerate(signatures):
        if sig is not None:
            lsh.insert(i, sig)
    pairs: set[tuple[int, int]] = set()
    for i, sig in enumerate(signatures):
        if sig is None:
            continue
        for j in lsh.query(sig):
            other = signatures[j]
            if j > i and other is not None and sig.jaccard(other) >= threshold:
                pairs.add((i, j))
    return sorted(pairs)


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving; the root of a set is its smallest index."""

    def __init__(self, n: int) -> None:
        self._parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self._parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self._parent[max(ri, rj)] = min(ri, rj)

    def components(self) -> list[list[int]]:
        """Every set as a sorted list of indices, ordered by smallest index."""
        by_root: dict[int, list[int]] = {}
        for i in range(len(self._parent)):
            by_root.setdefault(self.find(i), []).append(i)
        return list(by_root.values())


def dedupe_exact(items: Sequence[Item]) -> tuple[list[Item], list[Removal]]:
    """Items without exact duplicates (raw bytes, then rendered text), first kept."""
    kept: list[Item] = []
    removed: list[Removal] = []
    seen_raw: dict[str, str] = {}
    seen_text: dict[str, str] = {}
    for item in items:
        text_hash = item.text_sha256
        if item.raw_sha256 in seen_raw:
            removed.append(Removal(item.id, "exact-raw", seen_raw[item.raw_sha256]))
        elif text_hash in seen_text:
            removed.append(Removal(item.id, "exact-text", seen_text[text_hash]))
        else:
            seen_raw[item.raw_sha256] = item.id
            seen_text[text_hash] = item.id
            kept.append(item)
    return kept, removed


def campaign_groups(
    items: Sequence[Item], near_pairs: Iterable[tuple[int, int]]
) -> list[list[int]]:
    """Connected components of near-duplicate pairs and shared (sender domain, template).

    Messages without a sender domain or with an empty subject template are linked by
    near-duplicate pairs only.
    """
    uf = UnionFind(len(items))
    for i, j in near_pairs:
        uf.union(i, j)
    first_with_key: dict[tuple[str, str], int] = {}
    for i, item in enumerate(items):
        template = subject_template(item.subject)
        domain = item.sender_domain.strip().lower()
        if domain and template:
            uf.union(first_with_key.setdefault((domain, template), i), i)
    return uf.components()


def _group_hash(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


def assign_groups(
    groups: Sequence[Sequence[Item]], fractions: Mapping[str, float], seed: int
) -> list[str]:
    """The split of each group, stratified by the group's majority label.

    Within a stratum the groups are ordered by a seeded hash of their smallest id; a group
    goes to the split whose cumulative fraction interval holds its size-weighted midpoint.
    """
    names = [s for s in SPLITS if fractions.get(s, 0.0) > 0]
    bounds: list[float] = []
    total_fraction = sum(fractions[s] for s in names)
    acc = 0.0
    for s in names:
        acc += fractions[s] / total_fraction
        bounds.append(acc)
    label_order = sorted({item.label for group in groups for item in group})
    strata: dict[str, list[int]] = {}
    for g, group in enumerate(groups):
        counts = Counter(item.label for item in group)
        label = max(label_order, key=lambda lab: (counts[lab], -label_order.index(lab)))
        strata.setdefault(label, []).append(g)
    result = [""] * len(groups)
    for members in strata.values():
        ordered = sorted(members, key=lambda g: _group_hash(seed, min(i.id for i in groups[g])))
        total = sum(len(groups[g]) for g in ordered)
        done = 0
        for g in ordered:
            mid = (done + len(groups[g]) / 2) / total
            done += len(groups[g])
            result[g] = next((s for s, b in zip(names, bounds, strict=True) if mid < b), names[-1])
    return result


def plan_splits(
    items: Sequence[Item],
    *,
    seed: int,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    holdout_sources: Collection[str] = (),
    near_threshold: float = 0.8,
    drop_near_duplicates: bool = True,
) -> SplitPlan:
    """Deduplicate, group and split `items` (ids unique) as the module docstring states."""
    kept, removed = dedupe_exact(items)
    pairs = near_duplicate_pairs([i.text for i in kept], near_threshold)
    n_pairs = len(pairs)
    if drop_near_duplicates:
        uf = UnionFind(len(kept))
        for i, j in pairs:
            uf.union(i, j)
        components = uf.components()
        for component in components:
            head = kept[component[0]].id
            removed.extend(Removal(kept[k].id, "near", head) for k in component[1:])
        kept, pairs = [kept[c[0]] for c in components], []
    groups = [[kept[k] for k in c] for c in campaign_groups(kept, pairs)]

    assignment: dict[str, str] = {}
    splittable: list[list[Item]] = []
    for group in groups:
        held = [i for i in group if in_holdout(i.source, holdout_sources)]
        if not held:
            splittable.append(group)
            continue
        for item in group:
            if in_holdout(item.source, holdout_sources):
                assignment[item.id] = HOLDOUT
            else:
                removed.append(Removal(item.id, "holdout-campaign", held[0].id))
    for group, split in zip(splittable, assign_groups(splittable, fractions, seed), strict=True):
        for item in group:
            assignment[item.id] = split
    order = {item.id: n for n, item in enumerate(items)}
    return SplitPlan(
        assignment=dict(sorted(assignment.items(), key=lambda kv: order[kv[0]])),
        removed=tuple(sorted(removed, key=lambda r: order[r.id])),
        groups=tuple(tuple(i.id for i in g) for g in sorted(groups, key=lambda g: -len(g))),
        near_pairs=n_pairs,
    )
