"""`metis data check` lists every bad row of a broken file; training stops or skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from megatron_metis.cli.main import main
from megatron_metis.config.data import DataConfig
from megatron_metis.config.loader import ConfigError, build_dataclass
from megatron_metis.data import DatasetError, load_problems

GOOD = {"id": "ok-1", "question": "Compute 2 + 3.", "answer": "5"}


def _broken_file(root: Path) -> tuple[Path, dict[str, str]]:
    Image.new("RGB", (56, 56), (255, 0, 0)).save(root / "red.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows: list[dict | str] = [
        GOOD,
        {"id": "ok-2", "question": "How many?", "answer": "1", "images": ["red.png"]},
        {"id": "no-question", "answer": "3"},
        {"id": "empty-answer", "question": "Q?", "answer": "  "},
        {"id": "missing-image", "question": "Q?", "answer": "1", "images": ["nope.png"]},
        {"id": "corrupt-image", "question": "Q?", "answer": "1", "images": ["corrupt.png"]},
        {"id": "too-long", "question": "word " * 600, "answer": "1"},
        {"id": "bad-choices", "question": "Q?", "answer": "A", "choices": "A,B"},
        {"id": "ok-1", "question": "again", "answer": "2"},
        {"question": "no id", "answer": "2"},
        "{not json",
    ]
    path = root / "broken.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    expected = {
        "no-question": "question",
        "empty-answer": "answer",
        "missing-image": "not found",
        "corrupt-image": "unreadable",
        "too-long": "max_prompt_tokens",
        "bad-choices": "choices",
        "ok-1": "duplicate",
        "#9": "'id'",
        "#10": "invalid JSON",
    }
    return path, expected


def test_check_reports_every_bad_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, expected = _broken_file(tmp_path)
    code = main(["data", "check", str(path), "--max-prompt-tokens", "512"])
    out = capsys.readouterr().out
    assert code == 1
    bad_lines = [line for line in out.splitlines() if line.startswith("BAD ")]
    assert len(bad_lines) == len(expected)
    for row_id, reason in expected.items():
        assert any(f"(id {row_id})" in line and reason in line for line in bad_lines), row_id
    assert "11 rows, 2 ok, 9 bad" in out


def test_check_clean_file_exits_zero(tmp_path: Path) -> None:
    path = tmp_path / "clean.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    assert main(["data", "check", str(path)]) == 0


def test_training_load_stops_or_skips(tmp_path: Path) -> None:
    path, expected = _broken_file(tmp_path)
    with pytest.raises(DatasetError, match="no-question"):
        load_problems([path], DataConfig(), None)
    loaded = load_problems([path], DataConfig(on_bad_row="skip"), None)
    # without a tokenizer the length check is off, so "too-long" loads
    assert [p.id for p in loaded.problems] == ["ok-1", "ok-2", "too-long"]
    assert loaded.n_skipped == len(expected) - 1 and loaded.n_rows == 11


def test_data_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match="data.on_bad_row"):
        build_dataclass(DataConfig, {"on_bad_row": "ignore"}, prefix="data")
    with pytest.raises(ConfigError, match="data.image_max_pixels"):
        build_dataclass(DataConfig, {"image_max_pixels": 10}, prefix="data")


@pytest.mark.parametrize(
    ("modality", "ids"),
    [("all", ["t-1", "i-1", "t-2"]), ("image", ["i-1"]), ("text", ["t-1", "t-2"])],
)
def test_train_modality_selects_training_rows(
    tmp_path: Path, modality: str, ids: list[str]
) -> None:
    from megatron_metis.data import load_training_problems

    Image.new("RGB", (56, 56), (255, 0, 0)).save(tmp_path / "red.png")
    rows = [
        {"id": "t-1", "question": "Compute 2 + 3.", "answer": "5"},
        {"id": "i-1", "question": "How many?", "answer": "1", "images": ["red.png"]},
        {"id": "t-2", "question": "Compute 1 + 1.", "answer": "2"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_dataclass(DataConfig, {"train_modality": modality})
    assert [p.id for p in load_training_problems([path], cfg, None)] == ids


def test_train_modality_without_matching_rows_names_the_key(tmp_path: Path) -> None:
    from megatron_metis.data import load_training_problems

    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    cfg = build_dataclass(DataConfig, {"train_modality": "image"})
    with pytest.raises(DatasetError, match=r"data.train_modality=image.*text.jsonl"):
        load_training_problems([path], cfg, None)
    with pytest.raises(ConfigError, match="train_modality"):
        build_dataclass(DataConfig, {"train_modality": "video"})
