"""Synthetic problem generators: small PIL-rendered images, and text-only tally/arithmetic/algebra.

Each generator draws a *scene* (plain JSON data) from a seeded ``random.Random``; the question,
the gold answer and the image are functions of the scene, and the expert solver (``solver.py``)
reads the same scene. Images are small (56-112 px) for the tiny Qwen2.5-VL's 28-px units.
Difficulty 1-3: 1 is a few objects or one-digit numbers, 3 adds distractors and operations.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

Scene = dict[str, Any]

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")
LETTERS = "abcdef"
CATEGORIES = ("count", "read_number", "compare", "tally", "arith", "algebra")
DIFFICULTIES = (1, 2, 3)


@dataclass(frozen=True)
class SynthProblem:
    """A generated problem before it is written out."""

    category: str
    difficulty: int
    question: str
    answer: str
    scene: Scene
    choices: tuple[str, ...] | None = None
    image: Image.Image | None = field(default=None, compare=False)


def _count(rng: random.Random, difficulty: int) -> SynthProblem:
    size, grid = (56, 2) if difficulty == 1 else (84, 3)
    cells = rng.sample(range(grid * grid), grid * grid)
    target_color = rng.choice(sorted(COLORS))
    target_shape = rng.choice(SHAPES) if difficulty == 3 else None
    n_target = rng.randint(1, 3 if difficulty == 1 else 5)
    n_other = 0 if difficulty == 1 else rng.randint(1, grid * grid - n_target)
    shapes = []
    for i, cell in enumerate(cells[: n_target + n_other]):
        if i < n_target:
            color, shape = target_color, target_shape or rng.choice(SHAPES)
        elif target_shape is not None and rng.random() < 0.5:
            color = target_color
            shape = rng.choice([s for s in SHAPES if s != target_shape])
        else:
            color = rng.choice([c for c in sorted(COLORS) if c != target_color])
            shape = rng.choice(SHAPES)
        shapes.append({"shape": shape, "color": color, "cell": cell})
    scene = {"size": size, "grid": grid, "color": target_color, "shape": target_shape}
    scene["shapes"] = sorted(shapes, key=lambda s: s["cell"])
    noun = f"{target_shape}s" if target_shape else "shapes"
    question = f"How many {target_color} {noun} are in the image?"
    answer = str(sum(_is_target(s, scene) for s in shapes))
    return SynthProblem("count", difficulty, question, answer, scene, image=_draw_shapes(scene))


def _is_target(shape: dict[str, Any], scene: Scene) -> bool:
    return shape["color"] == scene["color"] and scene["shape"] in (None, shape["shape"])


def _draw_shapes(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene["size"], scene["size"]), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for item in scene["shapes"]:
        row, col = divmod(item["cell"], scene["grid"])
        cx, cy, r = col * 28 + 14, row * 28 + 14, 10
        fill = COLORS[item["color"]]
        if item["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif item["shape"] == "square":
            draw.rectangle((cx - r + 1, cy - r + 1, cx + r - 1, cy + r - 1), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r - 1), (cx + r, cy + r - 1)], fill=fill)
    return image


def _read_number(rng: random.Random, difficulty: int) -> SynthProblem:
    if difficulty == 1:
        numbers, op = [rng.randint(0, 9)], None
    elif difficulty == 2:
        numbers, op = [rng.randint(1, 9), rng.randint(1, 9)], "sum"
    else:
        op = rng.choice(["sum", "difference", "product"])
        hi = 12 if op == "product" else 99
        numbers = sorted([rng.randint(2, hi), rng.randint(2, hi)], reverse=True)
    scene = {"numbers": numbers, "op": op, "color": rng.choice(sorted(COLORS))}
    if op is None:
        question = "What number is shown in the image?"
    else:
        question = f"What is the {op} of the two numbers in the image?"
    answer = str(_combine(numbers, op))
    return SynthProblem(
        "read_number", difficulty, question, answer, scene, image=_draw_numbers(scene)
    )


def _combine(numbers: list[int], op: str | None) -> int:
    if op is None:
        return numbers[0]
    a, b = numbers
    return {"sum": a + b, "difference": a - b, "product": a * b}[op]


def _draw_numbers(scene: Scene) -> Image.Image:
    width = 56 * len(scene["numbers"])
    image = Image.new("RGB", (width, 56), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=34)
    for i, number in enumerate(scene["numbers"]):
        draw.text(
            (i * 56 + 28, 28), str(number), fill=COLORS[scene["color"]], font=font, anchor="mm"
        )
    return image


def _compare(rng: random.Random, difficulty: int) -> SynthProblem:
    if difficulty < 3:
        gap = rng.randint(20, 40) if difficulty == 1 else rng.randint(6, 14)
        short = rng.randint(10, 70 - gap)
        heights = [short, short + gap] if rng.random() < 0.5 else [short + gap, short]
        scene = {"kind": "bars", "heights": heights}
        question, choices = "Which bar is taller?", ("the left bar", "the right bar")
        answer = "A" if heights[0] > heights[1] else "B"
    else:
        side = rng.randint(12, 30)
        radius = rng.choice([r for r in range(6, 20) if abs(3.14159 * r * r / side**2 - 1) > 0.25])
        scene = {"kind": "areas", "side": side, "radius": radius}
        question, choices = "Which shape has the larger area?", ("the square", "the circle")
        answer = "A" if side * side > 3.14159 * radius * radius else "B"
    image = _draw_compare(scene)
    return SynthProblem("compare", difficulty, question, answer, scene, choices, image)


def _draw_compare(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (84, 84), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if scene["kind"] == "bars":
        for i, height in enumerate(scene["heights"]):
            x = 14 + i * 42
            draw.rectangle((x, 78 - height, x + 14, 78), fill=COLORS["blue"])
        draw.line((4, 79, 80, 79), fill=(0, 0, 0))
    else:
        s, r = scene["side"], scene["radius"]
        draw.rectangle((21 - s // 2, 42 - s // 2, 21 + s // 2, 42 + s // 2), fill=COLORS["green"])
        draw.ellipse((63 - r, 42 - r, 63 + r, 42 + r), fill=COLORS["red"])
    return image


def _tally(rng: random.Random, difficulty: int) -> SynthProblem:
    """Counting in text, the text-only twin of ``count``: a tiny model learns it, so an RL run
    on text-only data has something to improve (the paper's RL-data ablation)."""
    length, most, alphabet = {1: ((4, 6), 3, 3), 2: ((7, 10), 5, 5), 3: ((12, 16), 8, 6)}[
        difficulty
    ]
    letters = LETTERS[:alphabet]
    target = rng.choice(letters)
    n_target = rng.randint(1, most)
    others = [c for c in letters if c != target]
    sequence = [target] * n_target
    sequence += [rng.choice(others) for _ in range(rng.randint(*length) - n_target)]
    rng.shuffle(sequence)
    scene = {"letter": target, "sequence": sequence}
    question = f"How many times does the letter {target} appear in: {' '.join(sequence)}?"
    return SynthProblem("tally", difficulty, question, str(n_target), scene)


def _arith(rng: random.Random, difficulty: int) -> SynthProblem:
    if difficulty == 1:
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), "+"
    elif difficulty == 2:
        op = rng.choice(["+", "-"])
        a, b = sorted([rng.randint(10, 99), rng.randint(1, 99)], reverse=True)
    else:
        a, b, op = rng.randint(2, 12), rng.randint(2, 12), "*"
    scene = {"a": a, "b": b, "op": op}
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return SynthProblem("arith", difficulty, f"Compute {a} {op} {b}.", str(value), scene)


def _algebra(rng: random.Random, difficulty: int) -> SynthProblem:
    x = rng.randint(-9 if difficulty == 3 else 0, 12)
    a = 1 if difficulty == 1 else rng.randint(2, 9)
    b = rng.randint(1, 20)
    c = rng.randint(1, a - 1) if difficulty == 3 and a > 2 else 0
    d = a * x + b - c * x
    scene = {"a": a, "b": b, "c": c, "d": d}
    left = f"{'' if a == 1 else a}x + {b}"
    right = f"{c}x + {d}" if c else str(d) if d >= 0 else f"-{-d}"
    if c and d < 0:
        right = f"{c}x - {-d}"
    return SynthProblem("algebra", difficulty, f"Solve for x: {left} = {right}.", str(x), scene)


GENERATORS: dict[str, Callable[[random.Random, int], SynthProblem]] = {
    "count": _count,
    "read_number": _read_number,
    "compare": _compare,
    "tally": _tally,
    "arith": _arith,
    "algebra": _algebra,
}


def generate(rng: random.Random, category: str, difficulty: int) -> SynthProblem:
    """One problem of ``category`` at ``difficulty`` (1-3) drawn from ``rng``."""
    if category not in GENERATORS:
        raise ValueError(f"category must be one of {sorted(GENERATORS)}, got {category!r}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty}")
    return GENERATORS[category](rng, difficulty)
