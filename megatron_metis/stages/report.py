"""The pipeline's final report: the ablation table (base / RL / RL+SFT per dataset) and plots.

``write_report(results, out_dir, ...)`` writes:
    ``results.json``: ``{"stages": [...], "datasets": [...], "table": {stage: {dataset: acc,
    "average": acc}}, "evals": {stage: eval.json}, "plots": [...]}``;
    ``results.md``: the table (accuracy in %, like the paper's Table 2) and the plots;
    ``rl_curves.png``: RL accuracy reward and mean response length vs step (the paper's Fig. 3);
    ``sft_loss.png``: SFT loss vs step.
The curves come from the trainer's ``metrics.jsonl`` (one JSON object per logged step, with
``phase``: ``rl`` rows give the RL curves, ``sft`` rows the loss); the metric names are looked
up in ``*_KEYS`` (first present wins: the trainer logs ``accuracy``, ``response_length/mean``
and ``loss``). Plots use matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_metis.data.io import read_jsonl
from megatron_metis.stages.runner import atomic_write_bytes, atomic_write_json, atomic_write_text

STEP_KEYS = ("step", "iteration", "global_step")
ACCURACY_KEYS = (
    "accuracy",
    "rewards/accuracy_mean",
    "reward/accuracy",
    "accuracy_reward",
    "accuracy_mean",
    "rl/accuracy",
)
LENGTH_KEYS = (
    "response_length/mean",
    "response_length_mean",
    "response_len_mean",
    "rl/response_length",
    "response_length",
    "mean_response_length",
)
LOSS_KEYS = ("sft/loss", "loss", "train/loss", "lm_loss")
STAGE_TITLES = {"base": "Base", "rl": "RL", "rl_sft": "RL+SFT"}


def load_eval(result: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """An ``eval.json`` dict (a path or an already-loaded dict)."""
    if isinstance(result, Mapping):
        return dict(result)
    return json.loads(Path(result).read_text())


def ablation_table(evals: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """(datasets in first-seen order, {stage: {dataset: accuracy, "average": mean}})."""
    datasets: list[str] = []
    for ev in evals.values():
        datasets += [d for d in ev["datasets"] if d not in datasets]
    table: dict[str, dict[str, float | None]] = {}
    for stage, ev in evals.items():
        row: dict[str, float | None] = {
            d: ev["datasets"][d]["accuracy"] if d in ev["datasets"] else None for d in datasets
        }
        present = [v for v in row.values() if v is not None]
        row["average"] = sum(present) / len(present) if present else None
        table[stage] = row
    return datasets, table


def table_markdown(datasets: Sequence[str], table: Mapping[str, Mapping[str, Any]]) -> str:
    """The ablation table in Markdown (accuracy in %, one decimal)."""
    cell = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| model | avg. | " + " | ".join(datasets) + " |"]
    lines.append("|---|---:|" + "---:|" * len(datasets))
    for stage, row in table.items():
        cells = [STAGE_TITLES.get(stage, stage), cell(row["average"])]
        cells += [cell(row[d]) for d in datasets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def metric_series(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str], *, phase: str | None = None
) -> tuple[str, list[float], list[float]] | None:
    """(key, steps, values) of the first key of ``keys`` present in ``rows``; None if none is.

    Rows of another ``phase`` (when rows carry one) are ignored; a step logged twice (a resumed
    run) keeps its last value.
    """
    if phase is not None:
        rows = [r for r in rows if r.get("phase", phase) == phase]
    for key in keys:
        points: dict[float, float] = {}
        for i, r in enumerate(rows):
            if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool):
                points[float(_step(r, i))] = float(r[key])
        if points:
            steps = sorted(points)
            return key, steps, [points[s] for s in steps]
    return None


def _step(row: Mapping[str, Any], index: int) -> float:
    for key in STEP_KEYS:
        if isinstance(row.get(key), int | float):
            return row[key]
    return index + 1


def _figure_png(panels: Sequence[tuple[str, tuple[str, list[float], list[float]]]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * len(panels), 3.6), dpi=100)
    for i, (title, (key, steps, values)) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, linewidth=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_rl_curves(metrics_file: str | Path, out_png: str | Path) -> Path | None:
    """RL accuracy reward and response length vs step; None when neither metric is logged."""
    rows = read_jsonl(metrics_file)
    panels = [
        (title, series)
        for title, keys in (("Accuracy reward", ACCURACY_KEYS), ("Response length", LENGTH_KEYS))
        if (series := metric_series(rows, keys, phase="rl")) is not None
    ]
    return atomic_write_bytes(out_png, _figure_png(panels)) if panels else None


def plot_sft_loss(metrics_file: str | Path, out_png: str | Path) -> Path | None:
    """SFT loss vs step; None when no loss is logged."""
    series = metric_series(read_jsonl(metrics_file), LOSS_KEYS, phase="sft")
    if series is None:
        return None
    return atomic_write_bytes(out_png, _figure_png([("SFT loss", series)]))


def write_report(
    results: Mapping[str, Mapping[str, Any] | str | Path],
    out_dir: str | Path,
    *,
    rl_metrics: Sequence[str | Path] = (),
    sft_metrics: Sequence[str | Path] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and the plots into ``out_dir``.

    Args:
        results: stage name (``base``, ``rl``, ``rl_sft``, or ``rl_r2``... for later rounds)
            -> its ``eval.json`` (dict or path), in table order.
        rl_metrics / sft_metrics: the trainer's ``metrics.jsonl`` of each RL / SFT phase (one
            plot per file; several files for several rounds).
        extra: stage summaries (triage and expert reports, SFT mix counts) added to the JSON.
    """
    out = Path(out_dir)
    evals = {stage: load_eval(r) for stage, r in results.items()}
    datasets, table = ablation_table(evals)
    plots = _plots(out, rl_metrics, sft_metrics)
    summary = {
        "stages": list(evals),
        "datasets": datasets,
        "table": table,
        "evals": evals,
        "plots": [p.name for p in plots],
        **({"extra": dict(extra)} if extra else {}),
    }
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "results.md", _markdown(datasets, table, plots, extra))
    return summary


def _plots(out: Path, rl: Sequence[str | Path], sft: Sequence[str | Path]) -> list[Path]:
    plots = []
    for i, f in enumerate(rl):
        name = "rl_curves.png" if i == 0 else f"rl_curves_r{i + 1}.png"
        plots.append(plot_rl_curves(f, out / name))
    for i, f in enumerate(sft):
        name = "sft_loss.png" if i == 0 else f"sft_loss_r{i + 1}.png"
        plots.append(plot_sft_loss(f, out / name))
    return [p for p in plots if p is not None]


def _markdown(
    datasets: Sequence[str],
    table: Mapping[str, Mapping[str, Any]],
    plots: Sequence[Path],
    extra: Mapping[str, Any] | None,
) -> str:
    lines = [
        "# Metis-RISE results",
        "",
        "Held-out accuracy (%), same verifier for every stage.",
        "",
    ]
    lines.append(table_markdown(datasets, table))
    for p in plots:
        lines += [f"![{p.stem}]({p.name})", ""]
    if extra:
        lines += ["## Stage summaries", "", "```json", json.dumps(extra, indent=2), "```", ""]
    return "\n".join(lines)
