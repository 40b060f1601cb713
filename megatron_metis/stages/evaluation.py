"""Evaluation: accuracy per dataset and per category with the training verifier.

``greedy``: one temperature-0 response per problem; accuracy = share verified correct.
``sampled``: ``num_samples`` responses per problem; accuracy = mean share correct, and the
unbiased pass@k estimator ``1 - C(n - c, k) / C(n, k)`` averaged over problems.

Files in the output folder: ``predictions/<dataset>.jsonl`` (per problem: samples and verdicts;
the progress log, so a re-run evaluates only what is missing), ``eval.json`` and ``eval.md``.

``eval.json``::

    {"label": ..., "mode": "greedy" | "sampled", "num_samples": n, "pass_k": [..],
     "datasets": {name: {"file": ..., "num_problems": N, "accuracy": a, "pass@k": {"1": ..},
                         "truncated": share of responses cut at max_new_tokens,
                         "categories": {cat: {"num_problems", "accuracy", "pass@k",
                                              "truncated"}}}},
     "average": mean accuracy over datasets}
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_metis.config.rl import RolloutConfig
from megatron_metis.config.stages import EvalConfig
from megatron_metis.data.io import ProgressLog
from megatron_metis.data.schema import Problem
from megatron_metis.rollout.client import RolloutClient, ScoredSample, Scorer, sampling_params
from megatron_metis.stages.runner import atomic_write_json, atomic_write_text


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of a problem with ``c`` correct of ``n`` samples (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def aggregate(
    problems: Sequence[Problem], samples: Sequence[Sequence[ScoredSample]], pass_k: Sequence[int]
) -> dict[str, Any]:
    """Accuracy and pass@k over ``problems``, overall and per category."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(problems):
        groups[p.category or "(none)"].append(i)

    def summary(indices: Sequence[int]) -> dict[str, Any]:
        counts = [(len(samples[i]), sum(s.correct for s in samples[i])) for i in indices]
        m = max(1, len(counts))
        cut = sum(s.finish_reason == "length" for i in indices for s in samples[i])
        return {
            "num_problems": len(counts),
            "accuracy": sum(c / n for n, c in counts) / m,
            "pass@k": {
                str(k): sum(pass_at_k(n, c, k) for n, c in counts) / m
                for k in pass_k
                if all(k <= n for n, _ in counts)
            },
            # a truncated response has no answer and scores 0: a high share means the eval's
            # max_new_tokens, not the model, sets the accuracy
            "truncated": cut / max(1, sum(n for n, _ in counts)),
        }

    out = summary(range(len(problems)))
    out["categories"] = {cat: summary(idx) for cat, idx in sorted(groups.items())}
    return out


def evaluate(
    datasets: Mapping[str, Sequence[Problem]],
    client: RolloutClient,
    scorer: Scorer,
    cfg: EvalConfig,
    *,
    rollout: RolloutConfig,
    out_dir: str | Path,
    label: str = "",
    files: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Evaluate every dataset into ``out_dir`` (resumable); return and write ``eval.json``.

    Args:
        datasets: problems by dataset name.
        label: the checkpoint's name in the report (e.g. ``base``, ``rl``, ``rl_sft``).
        files: dataset name -> file, recorded in the report.
    """
    out = Path(out_dir)
    params = sampling_params(rollout, cfg)
    pass_k = [1] if cfg.mode == "greedy" else list(cfg.pass_k)
    result: dict[str, Any] = {
        "label": label,
        "mode": cfg.mode,
        "num_samples": params.n,
        "pass_k": pass_k,
        "datasets": {},
    }
    for name, problems in datasets.items():
        samples = client.score_problems(
            problems,
            params,
            scorer,
            progress=ProgressLog(out / "predictions" / f"{name}.jsonl"),
            prompts_per_batch=cfg.prompts_per_batch,
        )
        entry = {"file": (files or {}).get(name, ""), **aggregate(problems, samples, pass_k)}
        result["datasets"][name] = entry
    accs = [d["accuracy"] for d in result["datasets"].values()]
    result["average"] = sum(accs) / len(accs) if accs else 0.0
    atomic_write_json(out / "eval.json", result)
    atomic_write_text(out / "eval.md", eval_markdown(result))
    return result


def eval_markdown(result: Mapping[str, Any]) -> str:
    """``eval.json`` as Markdown: one table of datasets, one of categories per dataset."""
    ks = [str(k) for k in result["pass_k"]]
    show_k = result["mode"] == "sampled"
    head = "| dataset | problems | accuracy |" + "".join(f" pass@{k} |" for k in ks if show_k)
    head += " truncated |"
    sep = "|---|---:|---:|" + "---:|" * ((len(ks) if show_k else 0) + 1)
    title = f"# Evaluation{': ' + result['label'] if result['label'] else ''}"
    mode = result["mode"] + (f", n={result['num_samples']}" if show_k else "")
    lines = [title, "", f"Mode: {mode}. Average accuracy {100 * result['average']:.1f}.", ""]
    lines += [head, sep]
    for name, d in result["datasets"].items():
        lines.append(_row(name, d, ks if show_k else []))
    for name, d in result["datasets"].items():
        lines += ["", f"## {name} by category", "", head.replace("dataset", "category"), sep]
        lines += [_row(cat, c, ks if show_k else []) for cat, c in d["categories"].items()]
    return "\n".join(lines) + "\n"


def _row(name: str, d: Mapping[str, Any], ks: Sequence[str]) -> str:
    cells = [name, str(d["num_problems"]), f"{100 * d['accuracy']:.1f}"]
    cells += [f"{100 * d['pass@k'][k]:.1f}" if k in d["pass@k"] else "-" for k in ks]
    cells.append(f"{100 * d.get('truncated', 0.0):.1f}")
    return "| " + " | ".join(cells) + " |"


def dataset_names(files: Sequence[str | Path]) -> dict[str, str]:
    """Dataset name (file stem, made unique with a suffix) -> file."""
    names: dict[str, str] = {}
    for f in files:
        stem = Path(f).stem
        name, i = stem, 2
        while name in names:
            name, i = f"{stem}_{i}", i + 1
        names[name] = str(f)
    return names
