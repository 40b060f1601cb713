"""Programmatic expert for the synthetic tasks: the stand-in for the paper's external expert.

It solves a problem from its scene (not from the stored answer) and writes the solution in the
format the RL format reward expects: ``<think> reasoning </think><answer> The answer is
$\\boxed{X}$ </answer>``.
"""

from __future__ import annotations

from megatron_metis.data.synth.tasks import Scene


def expert_solution(category: str, scene: Scene) -> str:
    """A short worked solution of the problem described by ``scene``, ending in a box."""
    solvers = {
        "count": _solve_count,
        "read_number": _solve_read_number,
        "compare": _solve_compare,
        "tally": _solve_tally,
        "arith": _solve_arith,
        "algebra": _solve_algebra,
    }
    if category not in solvers:
        raise ValueError(f"no expert for category {category!r}")
    reasoning, answer = solvers[category](scene)
    return f"<think> {reasoning} </think><answer> The answer is $\\boxed{{{answer}}}$ </answer>"


def _solve_count(scene: Scene) -> tuple[str, str]:
    noun = f"{scene['shape']}s" if scene["shape"] else "shapes"
    matches = [
        s
        for s in scene["shapes"]
        if s["color"] == scene["color"] and scene["shape"] in (None, s["shape"])
    ]
    seen = ", ".join(f"a {s['color']} {s['shape']}" for s in scene["shapes"])
    reasoning = f"I see {seen}. Counting the {scene['color']} {noun}: there are {len(matches)}."
    return reasoning, str(len(matches))


def _solve_read_number(scene: Scene) -> tuple[str, str]:
    numbers, op = scene["numbers"], scene["op"]
    if op is None:
        return f"The image shows the number {numbers[0]}.", str(numbers[0])
    a, b = numbers
    sign, value = {"sum": ("+", a + b), "difference": ("-", a - b), "product": ("*", a * b)}[op]
    reasoning = f"The numbers are {a} and {b}, so the {op} is {a} {sign} {b} = {value}."
    return reasoning, str(value)


def _solve_compare(scene: Scene) -> tuple[str, str]:
    if scene["kind"] == "bars":
        left, right = scene["heights"]
        taller = "left" if left > right else "right"
        reasoning = (
            f"The left bar is {left} high and the right bar is {right} high: "
            f"the {taller} bar is taller."
        )
        return reasoning, "A" if left > right else "B"
    side, radius = scene["side"], scene["radius"]
    square, circle = side * side, 3.14159 * radius * radius
    larger = "square" if square > circle else "circle"
    reasoning = (
        f"The square has area {side}^2 = {square} and the circle pi * {radius}^2 = {circle:.0f}: "
        f"the {larger} is larger."
    )
    return reasoning, "A" if square > circle else "B"


def _solve_tally(scene: Scene) -> tuple[str, str]:
    letter = scene["letter"]
    n = sum(c == letter for c in scene["sequence"])
    seen = ", ".join(scene["sequence"])
    return f"The letters are {seen}. Counting the {letter}'s: there are {n}.", str(n)


def _solve_arith(scene: Scene) -> tuple[str, str]:
    a, b, op = scene["a"], scene["b"], scene["op"]
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a} {op} {b} = {value}.", str(value)


def _solve_algebra(scene: Scene) -> tuple[str, str]:
    a, b, c, d = scene["a"], scene["b"], scene["c"], scene["d"]
    steps = [f"Subtract {b} from both sides: {a}x = {d - b}" + (f" - {c}x" if c else "") + "."]
    if c:
        steps.append(f"Subtract {c}x: {a - c}x = {d - b}.")
    x = (d - b) // (a - c)
    if a - c != 1:
        steps.append(f"Divide by {a - c}: x = {x}.")
    else:
        steps.append(f"So x = {x}.")
    return " ".join(steps), str(x)
