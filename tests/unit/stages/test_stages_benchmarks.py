"""tools/convert_benchmarks.py on small hand-made files in each benchmark's public format."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_metis.config.data import DataConfig
from megatron_metis.data.check import load_problems
from megatron_metis.rewards.accuracy import accuracy_reward

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location(
    "convert_benchmarks", ROOT / "tools" / "convert_benchmarks.py"
)
cb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cb)


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), "white").save(path)


def _convert(tmp_path, bench, data, name="in.json", **kw):
    src = tmp_path / "dl" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        src.write_text(data)
    else:
        src.write_text(json.dumps(data))
    out = tmp_path / "out" / f"{bench}.jsonl"
    assert cb.main([bench, "--input", str(src), "--out", str(out), *kw.get("args", [])]) == 0
    problems = load_problems([out], DataConfig(), None).problems
    assert all(p.load_images() for p in problems)  # every image path resolves
    return {p.id: p for p in problems}


def test_mathvista(tmp_path):
    _png(tmp_path / "dl" / "images" / "1.jpg")
    _png(tmp_path / "dl" / "images" / "2.jpg")
    rows = {
        "1": {
            "pid": "1",
            "question": "Which is larger?",
            "image": "images/1.jpg",
            "choices": ["the cup", "the box"],
            "answer": "the box",
            "question_type": "multi_choice",
            "answer_type": "text",
            "unit": None,
            "precision": None,
            "metadata": {"task": "figure question answering", "split": "testmini"},
        },
        "2": {
            "pid": "2",
            "question": "How long is it?",
            "image": "images/2.jpg",
            "choices": None,
            "answer": "1.5",
            "question_type": "free_form",
            "answer_type": "float",
            "unit": "cm",
            "precision": 1.0,
            "metadata": {"task": "geometry problem solving", "split": "testmini"},
        },
    }
    ps = _convert(tmp_path, "mathvista", rows)
    assert ps["mathvista-1"].answer == "B" and ps["mathvista-1"].choices == ("the cup", "the box")
    assert ps["mathvista-1"].category == "figure question answering"
    assert ps["mathvista-2"].question == "How long is it? (Unit: cm) (Round to 1 decimal places.)"
    assert ps["mathvista-2"].source == "MathVista"
    assert accuracy_reward("<answer>\\boxed{B}</answer>", "B", choices=ps["mathvista-1"].choices)


def test_mathvision(tmp_path):
    _png(tmp_path / "dl" / "images" / "7.jpg")
    rows = [
        {
            "id": "7",
            "question": "<image1>\nWhich shape comes next?",
            "options": ["A", "B", "C"],
            "answer": "C",
            "image": "images/7.jpg",
            "level": 2,
            "subject": "logic",
        },
        {
            "id": "8",
            "question": "How many edges? <image1>",
            "options": [],
            "answer": "12",
            "image": "images/7.jpg",
            "level": 4,
            "subject": "solid geometry",
        },
    ]
    ps = _convert(tmp_path, "mathvision", rows)
    assert ps["mathvision-7"].question == "Which shape comes next?"
    assert ps["mathvision-7"].answer == "C" and ps["mathvision-7"].difficulty == 2
    assert ps["mathvision-8"].choices is None and ps["mathvision-8"].category == "solid geometry"


def test_mathverse_keeps_vision_only(tmp_path):
    _png(tmp_path / "dl" / "images" / "a.png")
    rows = [
        {
            "sample_index": "1",
            "problem_index": "1",
            "problem_version": "Text Dominant",
            "question": "In the figure, find x.",
            "answer": "3",
            "question_type": "free-form",
            "image": "images/a.png",
            "metadata": {"subject": "plane geometry"},
        },
        {
            "sample_index": "5",
            "problem_index": "1",
            "problem_version": "Vision Only",
            "question": "",
            "answer": "B",
            "question_type": "multi-choice",
            "image": "images/a.png",
            "metadata": {"subject": "plane geometry"},
        },
    ]
    ps = _convert(tmp_path, "mathverse", rows)
    assert list(ps) == ["mathverse-5"]
    assert ps["mathverse-5"].answer == "B" and "letter" in ps["mathverse-5"].question


def test_dynamath_variant_from_file_name(tmp_path):
    _png(tmp_path / "dl" / "images" / "q1.png")
    rows = [
        {
            "id": "1",
            "question": "What is f(2)?",
            "image": "images/q1.png",
            "ground_truth": "4",
            "answer_type": "float",
            "subject": "algebra",
            "knowledge_level": "high school",
        }
    ]
    ps = _convert(tmp_path, "dynamath", rows, name="sample_variant3.json")
    assert list(ps) == ["dynamath-1-v3"] and ps["dynamath-1-v3"].answer == "4"


def test_wemath_splits_options(tmp_path):
    _png(tmp_path / "dl" / "img" / "w.png")
    rows = [
        {
            "ID": "1@3steps_1",
            "key": "3steps_1",
            "split": "testmini",
            "question": "What is the area?",
            "option": "A. 6; B. 8; C. 12; D. 24; E. No",
            "answer": "C",
            "image_path": "img/w.png",
            "knowledge concept": "Area of shapes",
        }
    ]
    ps = _convert(tmp_path, "wemath", rows)
    p = ps["wemath-1@3steps_1-3steps_1"]
    assert p.choices == ("6", "8", "12", "24", "No") and p.answer == "C"
    assert p.category == "Area of shapes"


def test_logicvista_from_keyed_json(tmp_path):
    _png(tmp_path / "dl" / "images" / "0.jpg")
    data = {
        "0": {
            "imagename": "0.jpg",
            "question": "Which two? A. x B. y C. z",
            "answer": "A, C",
            "reasoning": "...",
            "skill": ["inductive"],
        }
    }
    ps = _convert(tmp_path, "logicvista", data)
    assert ps["logicvista-0"].answer == "A,C" and ps["logicvista-0"].category == "inductive"


def test_parquet_with_embedded_images(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(buf, format="PNG")
    table = pa.Table.from_pylist(
        [
            {
                "pid": "9",
                "question": "Color?",
                "image": None,
                "decoded_image": {"bytes": buf.getvalue(), "path": None},
                "choices": ["red", "blue"],
                "answer": "red",
                "question_type": "multi_choice",
                "answer_type": "text",
                "metadata": {"task": "vqa", "split": "testmini"},
            }
        ]
    )
    src = tmp_path / "testmini.parquet"
    pq.write_table(table, src)
    out = tmp_path / "o" / "mv.jsonl"
    assert cb.convert("mathvista", [src], out) == 1
    [p] = load_problems([out], DataConfig(), None).problems
    assert p.answer == "A" and p.load_images()[0].size == (20, 20)


def test_bad_choice_answer_is_an_error(tmp_path):
    rows = [
        {
            "pid": "1",
            "question": "?",
            "image": "x.png",
            "choices": ["a", "b"],
            "answer": "c",
            "metadata": {},
        }
    ]
    with pytest.raises(ValueError, match="not one of the choices"):
        _convert(tmp_path, "mathvista", rows)
