"""Accuracy reward on answers in the styles of MathVista, MathVerse, MathVision, WeMath and
LogicVista, including wrong answers that naive string or float comparison would accept."""

from __future__ import annotations

import pytest

from megatron_metis.rewards import RewardScorer, accuracy_reward


def A(text: str) -> str:
    """A well-formed response whose answer span is ``text``."""
    return f"<think>reasoning</think><answer>{text}</answer>"


def B(text: str) -> str:
    return A(f"The answer is $\\boxed{{{text}}}$")


MC = ["10", "12", "14", "16"]
PMAT = "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"
PMAT_T = "\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}"

# (response, gold, expected, choices)
CASES: list[tuple[str, str, float, list[str] | None]] = [
    # multiple choice (MathVista / MathVision / WeMath)
    (B("B"), "B", 1.0, None),
    (A("The answer is (C)."), "C", 1.0, None),
    (A("option C"), "C", 1.0, None),
    (B("(C) 45^\\circ"), "C", 1.0, None),
    (B("\\text{(C)}"), "C", 1.0, None),
    (A("C. 5 cm"), "C", 1.0, None),
    (B("A"), "C", 0.0, None),
    (A("B or C"), "C", 0.0, None),  # "contains C" would accept
    (B("12"), "B", 1.0, MC),  # the text of choice B
    (B("14"), "B", 0.0, MC),
    (B("E"), "E", 1.0, None),
    (B("D"), "E", 0.0, None),
    # plain numbers (MathVista free-form)
    (B("1.5"), "1.5", 1.0, None),
    (B("1.50"), "1.5", 1.0, None),
    (B("15"), "1.5", 0.0, None),  # digits-only comparison would accept
    (B("12.0"), "12", 1.0, None),
    (B("12.01"), "12", 0.0, None),  # rounding to 1 decimal would accept
    (B("1,000"), "1000", 1.0, None),
    (B("1000.5"), "1000", 0.0, None),
    (B("-3"), "-3", 1.0, None),
    (B("3"), "-3", 0.0, None),  # stripping signs would accept
    (B("\\$15"), "15", 1.0, None),
    # percent (rule: 50% = 50 = 0.5)
    (B("50\\%"), "50%", 1.0, None),
    (B("0.5"), "50%", 1.0, None),
    (B("50"), "50%", 1.0, None),
    (B("5\\%"), "50%", 0.0, None),
    # fractions vs decimals
    (B("\\frac{1}{2}"), "0.5", 1.0, None),
    (B("0.25"), "\\frac{1}{4}", 1.0, None),
    (B("3/4"), "0.75", 1.0, None),
    (B("\\dfrac{3}{4}"), "3/4", 1.0, None),
    (B("0.333"), "\\frac{1}{3}", 0.0, None),  # float rounding to 2-3 digits would accept
    (B("0.7"), "3/4", 0.0, None),
    (B("-\\frac{1}{2}"), "-0.5", 1.0, None),
    (B("2.4"), "5/2", 0.0, None),
    (B("\\frac{2}{4}"), "1/2", 1.0, None),
    # radicals and pi (MathVerse / MathVision)
    (B("2\\sqrt{2}"), "\\sqrt{8}", 1.0, None),
    (B("\\sqrt{2}"), "\\sqrt{8}", 0.0, None),
    (B("3\\sqrt{3}"), "\\sqrt{27}", 1.0, None),
    (B("\\frac{\\sqrt{3}}{2}"), "\\frac{\\sqrt3}{2}", 1.0, None),
    (B("\\frac{\\sqrt{2}}{2}"), "\\frac{\\sqrt{3}}{2}", 0.0, None),
    (B("\\frac{8\\pi}{2}"), "4\\pi", 1.0, None),
    (B("6.28"), "2\\pi", 0.0, None),  # float rounding to 2 digits would accept
    (B("1.57"), "\\frac{\\pi}{2}", 0.0, None),
    # degrees and units
    (B("60^\\circ"), "60", 1.0, None),
    (B("60"), "60°", 1.0, None),
    (B("30^{\\circ}"), "60°", 0.0, None),
    (B("\\frac{\\pi}{3}"), "60°", 0.0, None),  # documented: no radian conversion
    (B("5 \\text{ cm}"), "5", 1.0, None),
    (B("5"), "5 cm", 1.0, None),
    (B("5 m"), "5 cm", 0.0, None),  # math-verify alone drops both units and accepts
    (B("12 \\text{ cm}^2"), "12", 1.0, None),
    # intervals and sets
    (B("[1,3)"), "[1,3)", 1.0, None),
    (B("(1,3)"), "[1,3)", 0.0, None),  # the same numbers: naive extraction would accept
    (B("x \\in (-\\infty,2]\\cup[5,\\infty)"), "(-\\infty, 2] \\cup [5, \\infty)", 1.0, None),
    (B("\\{3,2,1\\}"), "\\{1,2,3\\}", 1.0, None),
    (B("\\{1,2\\}"), "\\{1,2,3\\}", 0.0, None),
    (B("(2,1)"), "(1,2)", 0.0, None),
    # matrices, expressions, equations
    (B(PMAT), PMAT, 1.0, None),
    (B(PMAT_T), PMAT, 0.0, None),  # same entries: sorted-number comparison would accept
    (B("x^2+2x+1"), "(x+1)^2", 1.0, None),
    (B("x^2+2x+2"), "(x+1)^2", 0.0, None),
    (B("x=2"), "2", 1.0, None),
    (B("1.2\\times10^{3}"), "1200", 1.0, None),
    # text answers (LogicVista)
    (B("Yes"), "Yes", 1.0, None),
    (B("\\text{no}"), "No", 1.0, None),
    (B("sey"), "yes", 0.0, None),  # symbolic y*e*s == s*e*y would accept
    (B("Triangle."), "triangle", 1.0, None),
    (B("square"), "triangle", 0.0, None),
    (B("\\text{red}"), "red", 1.0, None),
    # extraction
    (A("5"), "5", 1.0, None),
    (A("The answer is $\\frac{1}{2}$"), "1/2", 1.0, None),
    ("<think>so</think><answer>\\boxed{7}", "7", 1.0, None),  # unclosed answer tag
    ("first \\boxed{3}, no: \\boxed{5}", "5", 1.0, None),  # last box, no answer tag
    ("first \\boxed{3}, no: \\boxed{5}", "3", 0.0, None),
    ("The result is 5.", "5", 0.0, None),  # neither answer tag nor box
    (A("\\boxed{}"), "0", 0.0, None),
    (B("5"), "\\boxed{5}", 1.0, None),
    # unusable gold answers never score 1
    (B("5"), "", 0.0, None),
    (B("\\frac{"), "\\frac{", 0.0, None),
]


@pytest.mark.parametrize("response,gold,expected,choices", CASES)
def test_accuracy_reward(
    response: str, gold: str, expected: float, choices: list[str] | None
) -> None:
    assert accuracy_reward(response, gold, choices=choices) == expected


def test_case_count() -> None:
    assert len(CASES) >= 60


def test_pool_scorer_agrees_with_in_process(scorer: RewardScorer) -> None:
    responses = [c[0] for c in CASES]
    batch = scorer.score(responses, [c[1] for c in CASES], choices=[c[3] for c in CASES])
    assert batch.accuracy == [c[2] for c in CASES]
    assert batch.metrics["n_timeout"] == 0 and batch.metrics["n_verifier_error"] == 0
    assert batch.metrics["n_gold_unparseable"] == 2
    assert batch.metrics["n_fast_path"] > len(CASES) // 2
