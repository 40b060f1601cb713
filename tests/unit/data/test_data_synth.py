"""Synthetic tasks: deterministic per seed, disjoint splits, expert solutions that verify."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from megatron_metis.config.data import DataConfig
from megatron_metis.data import load_problems
from megatron_metis.data.synth import CATEGORIES, write_synthetic_dataset
from megatron_metis.data.synth.build import generate_rows
from megatron_metis.rewards import accuracy_reward, format_reward


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, n=250, seed=7)
    return out


def test_deterministic_per_seed(dataset: Path, tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path / "again", n=250, seed=7)
    assert _tree_digest(tmp_path / "again") == _tree_digest(dataset)
    other = [r["id"] for r, _ in generate_rows(50, seed=8)]
    assert other != [r["id"] for r, _ in generate_rows(50, seed=7)]


def test_split_has_no_overlap(dataset: Path) -> None:
    rows = {
        name: [json.loads(x) for x in (dataset / f"{name}.jsonl").read_text().splitlines()]
        for name in ("train", "test")
    }
    assert len(rows["train"]) + len(rows["test"]) == 250
    assert len(rows["test"]) > 20 and len(rows["train"]) > 150
    keys = {name: {r["key"] for r in items} for name, items in rows.items()}
    assert not keys["train"] & keys["test"]
    # what the model sees (question + image bytes) never repeats across the splits
    seen = {name: set() for name in rows}
    for name, items in rows.items():
        for r in items:
            image = b"".join((dataset / p).read_bytes() for p in r.get("images", []))
            seen[name].add(hashlib.sha256(r["question"].encode() + image).hexdigest())
    assert not seen["train"] & seen["test"]
    assert {r["category"] for r in rows["train"]} == set(CATEGORIES)
    assert {r["difficulty"] for r in rows["train"]} == {1, 2, 3}


def test_every_expert_solution_scores_one(dataset: Path) -> None:
    loaded = load_problems([dataset / "train.jsonl", dataset / "test.jsonl"], DataConfig(), None)
    assert loaded.n_skipped == 0 and len(loaded.problems) == 250
    for problem in loaded.problems:
        assert problem.expert is not None
        assert format_reward(problem.expert) == 1.0, problem.id
        assert accuracy_reward(problem.expert, problem.answer, choices=problem.choices) == 1.0
        if problem.category in ("count", "read_number", "compare"):
            assert problem.modality == "image"
            width, height = problem.load_images()[0].size
            assert 56 <= width <= 112 and 56 <= height <= 112
        else:
            assert problem.modality == "text"


def test_parquet_embeds_images(tmp_path: Path) -> None:
    summary = write_synthetic_dataset(tmp_path, n=30, seed=3, fmt="parquet")
    assert not (tmp_path / "images").exists()
    loaded = load_problems(list(summary.files.values()), DataConfig(), None)
    images = [p for p in loaded.problems if p.images]
    assert len(loaded.problems) == 30 and images
    assert isinstance(images[0].images[0], bytes)
    assert images[0].load_images()[0].size[1] == 56 or images[0].load_images()[0].size[1] == 84


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="category"):
        generate_rows(3, seed=0, categories=["nope"])
    with pytest.raises(ValueError, match="distinct"):
        generate_rows(500, seed=0, categories=["arith"], difficulties=[1])


def test_an_exhausted_category_fails_fast_and_names_itself() -> None:
    """Text arithmetic at difficulty 1 has a few hundred distinct problems: asking for more
    stops after a run of duplicate draws, not after 50 * n attempts."""
    with pytest.raises(
        ValueError, match=r"could only generate \d+ distinct problems of 5000.*'arith'"
    ):
        generate_rows(5000, seed=0, categories=["arith"], difficulties=[1])


def test_exclude_keeps_a_new_pool_off_another_sets_problems(tmp_path: Path) -> None:
    """`metis data synth --exclude`: a second seed at the same difficulties repeats many
    problems of the first set (small problem spaces at difficulty 1); excluded, none."""
    from megatron_metis.cli.main import main

    first, pool = tmp_path / "first", tmp_path / "pool"
    args = ["data", "synth", "--n", "150", "--difficulties", "1,2"]
    assert main([*args, "--out", str(first), "--seed", "0"]) == 0
    files = [str(first / "train.jsonl"), str(first / "test.jsonl")]

    def keys(*paths: str | Path) -> set[str]:
        return {json.loads(line)["key"] for p in paths for line in Path(p).read_text().splitlines()}

    taken = keys(*files)
    plain = generate_rows(150, seed=7, difficulties=[1, 2])
    assert {row["key"] for row, _ in plain} & taken  # the overlap --exclude exists for
    code = main([*args, "--out", str(pool), "--seed", "7", "--test-frac", "0", "--exclude", *files])
    assert code == 0
    new = keys(pool / "train.jsonl")
    assert len(new) == 150 and not new & taken


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_tally_answers_count_the_letter_in_the_question(difficulty: int) -> None:
    rows = [
        r
        for r, _ in generate_rows(
            40, seed=difficulty, categories=["tally"], difficulties=[difficulty]
        )
    ]
    longest = {1: 6, 2: 10, 3: 16}[difficulty]
    for row in rows:
        letter = row["question"].split("the letter ")[1][0]
        sequence = row["question"].split(": ")[1].rstrip("?").split(" ")
        assert 1 <= len(sequence) <= longest
        assert row["answer"] == str(sequence.count(letter)) != "0"
        assert row["expert"].endswith(f"\\boxed{{{row['answer']}}}$ </answer>")
        assert "images" not in row or not row["images"]
