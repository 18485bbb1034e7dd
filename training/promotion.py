"""The promotion gate: does a challenger adapter replace the champion?

A pure decision over metrics measured on the same sets (the test split and the
leave-one-source-out holdout): the challenger must be at least as good on F1, within a
margin, and not worse calibrated (ECE), on every set both were measured on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Decision:
    promote: bool
    forced: bool = False
    reasons: list[str] = field(default_factory=list)


SetMetrics = Mapping[str, Mapping[str, float | None]]
"""{set name: {"f1": ..., "ece": ...}}"""


def decide_promotion(
    challenger: SetMetrics,
    champion: SetMetrics | None,
    *,
    f1_margin: float = 0.0,
    ece_margin: float = 0.01,
    force: bool = False,
) -> Decision:
    """Whether to move `champion` to the challenger, with the reason for each set."""
    if champion is None:
        return Decision(True, force, ["no champion yet: the challenger becomes champion"])
    reasons: list[str] = []
    passed = True
    shared = sorted(set(challenger) & set(champion))
    if not shared:
        return Decision(force, force, ["challenger and champion share no evaluation set"])
    for name in shared:
        ch_f1, cp_f1 = _value(challenger[name], "f1"), _value(champion[name], "f1")
        ch_ece, cp_ece = _value(challenger[name], "ece"), _value(champion[name], "ece")
        if ch_f1 < cp_f1 - f1_margin:
            passed = False
            reasons.append(f"{name}: F1 {ch_f1:.4f} < champion {cp_f1:.4f} - margin {f1_margin}")
        else:
            reasons.append(f"{name}: F1 {ch_f1:.4f} vs champion {cp_f1:.4f}: ok")
        if ch_ece > cp_ece + ece_margin:
            passed = False
            reasons.append(
                f"{name}: ECE {ch_ece:.4f} > champion {cp_ece:.4f} + margin {ece_margin}"
            )
    if force and not passed:
        reasons.append("forced: promoted although the gate did not pass")
    return Decision(passed or force, force and not passed, reasons)


def _value(metrics: Mapping[str, float | None], key: str) -> float:
    value = metrics.get(key)
    return 0.0 if value is None or math.isnan(value) else float(value)
