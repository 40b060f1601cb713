"""Exact decisions that need no symbolic verifier, and the gold-answer plan they share.

A gold answer is classified once (``plan_gold``, cached by the caller) as a choice letter, a
plain number with an optional unit, a text answer, or math. ``decide`` then returns True or
False only when the answer is certain, and None when math-verify must decide. Rules:

- choice letters: ``C``, ``(C)``, ``C.``, ``option C``, ``(C) 45°``; with ``choices`` given,
  the text of a choice counts as its letter. A choice gold is never sent to math-verify.
- plain decimal numbers (thousands commas allowed) are compared exactly as fractions, so
  ``0.333`` is not ``1/3`` (that pair is left to math-verify, which also says no).
- degrees: ``60°``, ``60^\\circ`` and ``60`` are equal. No conversion to radians.
- percent: ``50%`` equals ``50`` and ``0.5`` (math-verify's reading of a percent sign).
- units: a unit on one side only is ignored (``5 cm`` = ``5``); two different units are wrong
  (``5 cm`` != ``5 m``): units are never converted.
- identical normalised strings are equal (when their braces balance).
- text answers (words, e.g. ``yes``, ``triangle``) are compared case-insensitively and never
  sent to math-verify (which would read ``yes`` as the product y*e*s).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from megatron_metis.rewards.extract import last_boxed

_MAX_NUMBER_CHARS = 40
_WRAPPERS_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname|mbox)\s*\{([^{}]*)\}")
_DROP_RE = re.compile(r"\\left|\\right|\\displaystyle|\\[!,;: $]|\$|\\\(|\\\)|\\\[|\\\]")
_SPACE_RE = re.compile(r"\s+")
_NUMBER_RE = re.compile(
    r"(?P<num>[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+)\s*"
    r"(?P<unit>\\?%|\^\s*\{?\\circ\}?|°|\\circ|\\degree|degrees?|"
    r"(?P<word>[a-zA-Z]{1,12})(?:\^\{?[23]\}?|²|³)?)?"
)
_UNIT_WORDS = frozenset(
    "mm cm m km in inch inches ft feet foot yd mi mile miles mg g kg lb lbs oz t s sec second "
    "seconds min minute minutes h hr hrs hour hours day days week weeks year years ml mL l L "
    "unit units dollar dollars cent cents px pixel pixels mph kmh people students items".split()
)
_FRACTION_RES = (
    re.compile(r"(?P<sign>[+-]?)(?P<num>\d{1,20})/(?P<den>\d{1,20})"),
    re.compile(r"(?P<sign>[+-]?)\\frac\{(?P<num>[+-]?\d{1,20})\}\{(?P<den>\d{1,20})\}"),
    re.compile(r"(?P<sign>[+-]?)\\frac(?P<num>\d)(?P<den>\d)"),
)
_LETTER_RES = (
    re.compile(r"(?:(?:option|choice|answer):?)?\s*\(?([A-Ha-h])\)?\.?", re.IGNORECASE),
    re.compile(r"\(([A-Ha-h])\).*", re.DOTALL),
    re.compile(r"([A-H])[.:)].*", re.DOTALL),
    re.compile(r"(?:option|choice)\s*\(?([A-Ha-h])\)?(?![A-Za-z]).*", re.IGNORECASE | re.DOTALL),
)
_STANDALONE_LETTER_RE = re.compile(r"(?<![A-Za-z\\])([A-H])(?![A-Za-z])")
_MATH_WORDS = frozenset({"pi", "sin", "cos", "tan", "log", "ln", "exp", "inf", "infty", "sqrt"})
_TEXT_RE = re.compile(r"[A-Za-z][A-Za-z' -]*")

Kind = Literal["letter", "number", "text", "math", "empty"]


@dataclass(frozen=True)
class GoldPlan:
    """How a gold answer is checked.

    Attributes:
        kind: ``letter``, ``number``, ``text``, ``math`` (math-verify) or ``empty`` (unusable).
        norm: normalised gold string.
        letter: the choice letter for ``letter`` golds.
        number: (value, unit) for ``number`` golds; unit is "", "%", "deg", "frac" (written
            as a fraction ``a/b`` or ``\\frac{a}{b}``) or a word.
    """

    kind: Kind
    norm: str
    letter: str = ""
    number: tuple[Fraction, str] | None = None


def normalize(text: str) -> str:
    """Whitespace, ``$``, ``\\left``/``\\right``, spacing commands and ``\\text{}`` removed."""
    text = text.replace("\u2212", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _WRAPPERS_RE.sub(r"\1", text)
    text = _DROP_RE.sub(" ", text)
    text = _SPACE_RE.sub(" ", text).strip().rstrip(".").strip()
    return re.sub(r"(?<=[^A-Za-z0-9]) | (?=[^A-Za-z0-9])", "", text)


def parse_number(text: str) -> tuple[Fraction, str] | None:
    """A plain decimal number with an optional unit (``12``, ``-0.5``, ``1,000``, ``60°``), or an
    integer fraction (``3/4``, ``\\frac{3}{4}``: unit "frac")."""
    if len(text) > _MAX_NUMBER_CHARS + 16:
        return None
    for pattern in _FRACTION_RES:
        match = pattern.fullmatch(text)
        if match is not None and int(match.group("den")) != 0:
            value = Fraction(int(match.group("num")), int(match.group("den")))
            return (-value if match.group("sign") == "-" else value), "frac"
    match = _NUMBER_RE.fullmatch(text)
    if match is None or len(match.group("num")) > _MAX_NUMBER_CHARS:
        return None
    word = match.group("word")
    if word is not None and word not in _UNIT_WORDS:
        return None
    value = Fraction(match.group("num").replace(",", ""))
    unit = (match.group("unit") or "").replace(" ", "")
    if unit in ("%", "\\%"):
        unit = "%"
    elif "circ" in unit or unit in ("°", "\\degree", "degree", "degrees"):
        unit = "deg"
    return value, unit


def parse_letter(text: str) -> str | None:
    """The choice letter of ``C``, ``(C)``, ``C.``, ``option C``, ``(C) 45°``; else None."""
    for pattern in _LETTER_RES:
        match = pattern.fullmatch(text)
        if match is not None:
            return match.group(1).upper()
    return None


def plan_gold(gold: str) -> GoldPlan:
    """Classify a gold answer (see the module docstring); a boxed gold is its box's content."""
    boxed = last_boxed(gold)
    norm = normalize(gold if boxed is None else boxed)
    if not norm:
        return GoldPlan(kind="empty", norm=norm)
    if re.fullmatch(r"\(?[A-H]\)?", norm):
        return GoldPlan(kind="letter", norm=norm, letter=norm.strip("()"))
    number = parse_number(norm)
    if number is not None:
        return GoldPlan(kind="number", norm=norm, number=number)
    if _TEXT_RE.fullmatch(norm) and _is_words(norm):
        return GoldPlan(kind="text", norm=norm.casefold())
    return GoldPlan(kind="math", norm=norm)


def _is_words(text: str) -> bool:
    words = [w for w in re.split(r"[ '-]+", text.casefold()) if w]
    if any(w in _MATH_WORDS for w in words):
        return False
    return any(len(w) >= 3 for w in words) or text.casefold() in ("no", "on", "up")


def decide(plan: GoldPlan, answer: str, choices: Sequence[str] | None = None) -> bool | None:
    """True/False when ``answer`` is certainly right/wrong for ``plan``; None: ask math-verify."""
    norm = normalize(answer)
    if plan.kind == "empty" or not norm:
        return False
    if plan.kind == "letter":
        return _decide_letter(plan.letter, norm, choices)
    if plan.kind == "text":
        return norm.casefold() == plan.norm
    if norm == plan.norm and _balanced(norm):
        return True
    if plan.kind == "number" and plan.number is not None:
        number = parse_number(norm)
        return None if number is None else numbers_match(plan.number, number)
    return None


def _balanced(text: str) -> bool:
    """Braces balance: a malformed gold such as ``\\frac{`` is left to math-verify (-> 0)."""
    depth = 0
    for char in text:
        depth += (char == "{") - (char == "}")
        if depth < 0:
            return False
    return depth == 0


def numbers_match(gold: tuple[Fraction, str], pred: tuple[Fraction, str]) -> bool | None:
    """Equality of two (value, unit) numbers under the degree, percent and unit rules; None
    when a fraction meets an unequal decimal (left to math-verify's rounding)."""
    (gold_value, gold_unit), (pred_value, pred_unit) = gold, pred
    if "%" in (gold_unit, pred_unit):
        gold_plain, pred_plain = gold_unit in ("", "frac"), pred_unit in ("", "frac")
        if gold_value == pred_value:
            return True
        if gold_unit == "%" and pred_plain:
            return pred_value * 100 == gold_value
        if pred_unit == "%" and gold_plain:
            return pred_value == gold_value * 100
        return False
    if "frac" in (gold_unit, pred_unit):
        if gold_value == pred_value:
            return True
        other = pred if gold_unit == "frac" else gold
        # 0.333333 vs 1/3: math-verify rounds decimals, so an unequal decimal is not certain.
        return None if other[1] != "frac" and other[0].denominator != 1 else False
    if gold_unit and pred_unit and gold_unit != pred_unit:
        return False
    return gold_value == pred_value


def _decide_letter(letter: str, norm: str, choices: Sequence[str] | None) -> bool:
    found = parse_letter(norm)
    if found is not None:
        return found == letter
    if choices:
        matched = _matching_choices(norm, choices)
        if len(matched) == 1:
            return matched[0] == letter
    letters = set(_STANDALONE_LETTER_RE.findall(norm))
    return letters == {letter}


def _matching_choices(norm: str, choices: Sequence[str]) -> list[str]:
    matched = []
    for i, choice in enumerate(choices):
        plan = plan_gold(choice)
        if plan.kind in ("letter", "empty"):
            continue
        if plan.kind == "math":
            ok = norm == plan.norm
        else:
            ok = decide(plan, norm) is True
        if ok:
            matched.append(chr(ord("A") + i))
    return matched
