"""Math answers: pull the number out of a target's reply and compare it with the gold label.

Rule: the first number after the last ``Final Answer`` marker; when there is none, the last number
anywhere in the reply; no number at all gives None. A number may carry a sign (``-3``, ``−3``), thousands
separators (``1,234,567``), decimals (``.5``, ``12.50``), a currency sign (``$12.50``, ``-$3``), a fraction
(``3/4`` → 0.75) or a percent sign (``25%`` → 25, the number as written, which is how GSM8K/SVAMP gold
answers are given).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(
    r"""
    (?<![\w./])                                      # not glued to a word, a decimal point or a fraction bar
    (?P<sign>[-+\u2212]?)(?:\$\s?)?                  # the sign must touch the number: "5 - 3" is not -3
    (?P<int>\d{1,3}(?:,\d{3})+(?![\d,])|\d+)?         # 1,234,567 | 1234
    (?P<frac>(?(int)(?:\.\d+)?|\.\d+))               # .5 needs no integer part
    (?:/(?P<den>\d+(?:\.\d+)?)(?![\d.]))?            # 3/4
    (?P<pct>\s?%)?
    """,
    re.VERBOSE,
)
_MARKER = re.compile(r"final\s+answer", re.IGNORECASE)


def _matches(text: str) -> list[float]:
    out = []
    for m in _NUMBER.finditer(text):
        if not m.group("int") and not m.group("frac"):
            continue  # the optional parts matched the empty string
        value = float((m.group("int") or "0").replace(",", "") + (m.group("frac") or ""))
        if m.group("den"):
            den = float(m.group("den"))
            if den == 0:
                continue
            value /= den
        out.append(-value if m.group("sign") in ("-", "\u2212") else value)
    return out


def parse_number(text: str) -> float | None:
    """The single number a label is written as (``"1,234"``, ``"-3/4"``, ``"$12.50"``), else None."""
    nums = _matches(text)
    return nums[0] if len(nums) == 1 else None


def extract_number(reply: str | None) -> float | None:
    """The answer a reply gives (see the module doc for the rule), or None."""
    if not reply:
        return None
    markers = list(_MARKER.finditer(reply))
    if markers:
        after = _matches(reply[markers[-1].end():])
        if after:
            return after[0]
    nums = _matches(reply)
    return nums[-1] if nums else None


def answers_match(pred: float | None, gold: float | str, tol: float = 1e-6) -> bool:
    """Whether a predicted number equals the gold answer within ``tol`` (absolute)."""
    if pred is None:
        return False
    if isinstance(gold, str):
        parsed = parse_number(gold)
        if parsed is None:
            return False
        gold = parsed
    # A hair of relative slack so that 0.1 + 0.2 style float noise never decides correctness.
    return abs(pred - gold) <= tol + 1e-12 * max(1.0, abs(gold))
