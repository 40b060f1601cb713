"""Convert the six leaderboard benchmarks, from files the user downloaded, to the problem format.

    python tools/convert_benchmarks.py BENCH --input FILE [--image-root DIR] --out OUT.jsonl

BENCH is one of mathvista, mathvision, mathverse, dynamath, wemath, logicvista. Output rows:
``id, question, answer, images (paths relative to OUT), choices, category, source`` (plus
``difficulty`` where the benchmark has a level). Multiple-choice answers become letters.
Inputs may be JSON (a list, or an object keyed by id), JSONL, or Parquet (a Hugging Face export;
embedded image bytes are written to ``<OUT dir>/images/<bench>/``). Image paths in the input
are resolved against ``--image-root`` (default: the input file's folder).

Expected inputs (field names of the public releases; check yours if a converter complains):

- MathVista testmini (``AI4Math/MathVista``, ``testmini.json`` or the parquet split): ``pid``,
  ``question``, ``image``, ``choices`` (list or null), ``answer`` (the choice text for
  multiple choice), ``question_type`` (``multi_choice`` | ``free_form``), ``unit``,
  ``precision``, ``metadata.task`` (category), ``metadata.split``.
- MathVision (``MathLLMs/MathVision``, test): ``id``, ``question`` (with ``<image1>`` marks),
  ``options`` (list, empty for free form), ``answer`` (a letter when there are options),
  ``image``, ``level``, ``subject`` (category).
- MathVerse testmini, vision-only (``AI4Math/MathVerse``): ``sample_index``,
  ``problem_version`` (only ``Vision Only`` rows are kept), ``question`` (empty in vision-only
  rows: the question is in the image), ``query_cot`` / ``query_wo``, ``answer``,
  ``question_type``, ``image``, ``metadata.subject`` (category).
- DynaMath (``DynaMath/DynaMath_Sample``, ``sample_variant{k}`` files or splits): ``id``,
  ``question`` (options written in it), ``image``, ``ground_truth`` (or ``answer``),
  ``answer_type``, ``subject`` (category), ``knowledge_level``; the variant ``k`` comes from a
  ``variant`` field or the file name, and ids become ``dynamath-<id>-v<k>``.
- WeMath testmini (``We-Math/We-Math``, ``testmini.json``): ``ID``, ``key``, ``question``,
  ``option`` (``"A. x; B. y; ..."``), ``answer`` (letter), ``image_path``,
  ``knowledge concept`` (category).
- LogicVista (``Yijia-Xiao/LogicVista``, ``data/dataset.json`` keyed by id): ``imagename``
  (under ``images/``), ``question`` (options written in it), ``answer`` (letters, e.g.
  ``"A, C"``), ``skill`` (list; the first is the category).

Scoring differs from VLMEvalKit: it uses a GPT judge to extract answers, we use the training
verifier on the boxed answer, so numbers are comparable between our stages, not with the
leaderboard.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

Row = dict[str, Any]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Context:
    """Where images are read from and written to."""

    def __init__(self, bench: str, image_root: Path, out_file: Path) -> None:
        self.bench = bench
        self.image_root = image_root
        self.out_dir = out_file.resolve().parent

    def image(self, value: Any, row_id: str) -> str:
        """An input image (relative path, absolute path, or ``{"bytes": ..}``) as a path
        relative to the output file."""
        if isinstance(value, Mapping):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes):
            from PIL import Image

            path = self.out_dir / "images" / self.bench / f"{_safe(row_id)}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.open(io.BytesIO(value)).save(path, format="PNG")
        elif isinstance(value, str) and value:
            path = Path(value) if Path(value).is_absolute() else self.image_root / value
        else:
            raise ValueError(f"{row_id}: no image")
        return os.path.relpath(path.resolve(), self.out_dir)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _letter_of(answer: str, choices: list[str]) -> str:
    """The letter of ``answer`` among ``choices`` (already a letter: unchanged)."""
    answer = str(answer).strip()
    if answer in choices:
        return LETTERS[choices.index(answer)]
    if len(answer) == 1 and answer.upper() in LETTERS[: len(choices)]:
        return answer.upper()
    raise ValueError(f"answer {answer!r} is not one of the choices {choices}")


def _row(bench: str, rid: str, question: str, answer: Any, images: list[str], **kw: Any) -> Row:
    row: Row = {"id": f"{bench}-{rid}", "question": question.strip(), "answer": str(answer).strip()}
    row["images"] = images
    row["choices"] = kw.pop("choices", None) or None
    row["category"] = str(kw.pop("category", "") or "")
    row["source"] = kw.pop("source")
    row.update({k: v for k, v in kw.items() if v is not None})
    return row


def convert_mathvista(rows: Iterable[Row], ctx: Context) -> list[Row]:
    """MathVista testmini rows -> problems (choice texts become letters)."""
    out = []
    for r in rows:
        pid = str(r["pid"])
        choices = list(r.get("choices") or []) or None
        question = r["question"]
        if r.get("unit"):
            question += f" (Unit: {r['unit']})"
        if r.get("precision") is not None and r.get("answer_type") == "float":
            question += f" (Round to {int(r['precision'])} decimal places.)"
        answer = _letter_of(r["answer"], choices) if choices else r["answer"]
        meta = r.get("metadata") or {}
        image = r.get("decoded_image") if not r.get("image") else r["image"]
        out.append(
            _row(
                "mathvista",
                pid,
                question,
                answer,
                [ctx.image(image, f"mathvista-{pid}")],
                choices=choices,
                category=meta.get("task") or meta.get("category"),
                source="MathVista",
            )
        )
    return out


def convert_mathvision(rows: Iterable[Row], ctx: Context) -> list[Row]:
    """MathVision rows -> problems (``<imageN>`` marks removed from the question)."""
    out = []
    for r in rows:
        rid = str(r["id"])
        question = re.sub(r"\s*<image\d+>\s*", " ", r["question"]).strip()
        choices = [str(o) for o in r.get("options") or []] or None
        answer = _letter_of(r["answer"], choices) if choices else r["answer"]
        level = r.get("level")
        image = r.get("image") or r.get("decoded_image")
        out.append(
            _row(
                "mathvision",
                rid,
                question,
                answer,
                [ctx.image(image, f"mathvision-{rid}")],
                choices=choices,
                category=r.get("subject"),
                source="MathVision",
                difficulty=int(level) if level not in (None, "") else None,
            )
        )
    return out


_MATHVERSE_PROMPT = "Answer the question shown in the image."


def convert_mathverse(rows: Iterable[Row], ctx: Context) -> list[Row]:
    """MathVerse rows -> problems, keeping the ``Vision Only`` version only."""
    out = []
    for r in rows:
        if r.get("problem_version") != "Vision Only":
            continue
        rid = str(r["sample_index"])
        question = (r.get("question") or "").strip() or _MATHVERSE_PROMPT
        if r.get("question_type") == "multi-choice":
            question += " Give the letter of the correct option."
        meta = r.get("metadata") or {}
        out.append(
            _row(
                "mathverse",
                rid,
                question,
                r["answer"],
                [ctx.image(r["image"], f"mv-{rid}")],
                category=meta.get("subject"),
                source="MathVerse",
            )
        )
    return out


def convert_dynamath(rows: Iterable[Row], ctx: Context, *, variant: int | None = None) -> list[Row]:
    """DynaMath rows of one or more variants -> problems ``dynamath-<id>-v<k>``."""
    out = []
    for r in rows:
        k = r.get("variant", variant)
        rid = f"{r['id']}-v{k}" if k is not None else str(r["id"])
        answer = r.get("ground_truth", r.get("answer"))
        image = r.get("image") or r.get("decoded_image")
        out.append(
            _row(
                "dynamath",
                rid,
                r["question"],
                answer,
                [ctx.image(image, f"dynamath-{rid}")],
                category=r.get("subject"),
                source="DynaMath",
                knowledge_level=r.get("knowledge_level"),
            )
        )
    return out


def _split_options(text: str) -> list[str]:
    """``"A. x; B. y"`` (or one option per line) -> ``["x", "y"]``."""
    parts = re.split(r"(?:^|[;\n]\s*)([A-Z])[.:：、]\s*", text.strip())
    return [p.strip().rstrip(";").strip() for p in parts[2::2]]


def convert_wemath(rows: Iterable[Row], ctx: Context) -> list[Row]:
    """WeMath testmini rows -> problems (the ``option`` string split into choices)."""
    out, seen = [], set()
    for r in rows:
        rid = str(r["ID"]) + (f"-{r['key']}" if r.get("key") else "")
        while rid in seen:
            rid += "_"
        seen.add(rid)
        choices = _split_options(r.get("option") or "") or None
        image = r.get("image_path") or r.get("image")
        out.append(
            _row(
                "wemath",
                rid,
                r["question"],
                r["answer"],
                [ctx.image(image, f"wemath-{rid}")],
                choices=choices,
                category=r.get("knowledge concept"),
                source="WeMath",
            )
        )
    return out


def convert_logicvista(rows: Iterable[Row], ctx: Context) -> list[Row]:
    """LogicVista rows -> problems (letters answers like ``"A, C"`` become ``"A,C"``)."""
    out = []
    for r in rows:
        rid = str(r["id"])
        skill = r.get("skill")
        category = skill[0] if isinstance(skill, list) and skill else skill
        answer = ",".join(re.findall(r"[A-Z]", str(r["answer"]).upper())) or r["answer"]
        image = r.get("image") or f"images/{r['imagename']}"
        out.append(
            _row(
                "logicvista",
                rid,
                r["question"],
                answer,
                [ctx.image(image, f"lv-{rid}")],
                category=category,
                source="LogicVista",
            )
        )
    return out


CONVERTERS: dict[str, Callable[..., list[Row]]] = {
    "mathvista": convert_mathvista,
    "mathvision": convert_mathvision,
    "mathverse": convert_mathverse,
    "dynamath": convert_dynamath,
    "wemath": convert_wemath,
    "logicvista": convert_logicvista,
}


def read_input(path: Path) -> list[Row]:
    """Rows of a JSON (list, or object keyed by id: the key becomes ``id``), JSONL or Parquet."""
    if path.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):
        return [{"id": key, **value} for key, value in data.items()]
    return list(data)


def convert(bench: str, inputs: list[Path], out: Path, *, image_root: Path | None = None) -> int:
    """Convert ``inputs`` of ``bench`` into ``out`` (JSONL); returns the number of rows."""
    rows: list[Row] = []
    for path in inputs:
        ctx = Context(bench, image_root or path.resolve().parent, out)
        kwargs: dict[str, Any] = {}
        if bench == "dynamath":
            m = re.search(r"variant(\d+)", path.stem)
            kwargs["variant"] = int(m.group(1)) if m else None
        rows += CONVERTERS[bench](read_input(path), ctx, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(out)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", choices=sorted(CONVERTERS))
    parser.add_argument("--input", nargs="+", required=True, type=Path, help="downloaded file(s)")
    parser.add_argument("--image-root", type=Path, default=None, help="base of image paths")
    parser.add_argument("--out", required=True, type=Path, help="output JSONL")
    args = parser.parse_args(argv)
    n = convert(args.bench, args.input, args.out, image_root=args.image_root)
    print(f"{args.out}: {n} problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
