"""Expert augmentation: trajectories for the prompts the RL model never solves (p = 0).

Sources (one interface, ``ExpertSource.propose``):
    ``FileExpert``: a JSONL file of expert responses keyed by problem id;
    ``OpenAIExpert``: an OpenAI-compatible chat endpoint (``openai_client``);
    ``LocalModelExpert``: a local model through the rollout engine;
    ``SolverExpert``: the ``expert`` field of the rows (the synthetic tasks' programmatic solver).

Every candidate is put into the ``<think>..</think><answer>..\\boxed{}..</answer>`` format when
it is not (``normalize_trajectory``) and kept only when the verifier accepts its answer; the
others are rejected with a reason, counted and listed. Rejected text never reaches the SFT set.

Files in the stage folder: ``expert.jsonl`` (SFT rows, ``origin: expert``), ``rejects.jsonl``
(``{id, candidate, reason, text}``), ``report.json`` / ``report.md``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from megatron_metis.config.stages import ExpertConfig
from megatron_metis.data.messages import question_text
from megatron_metis.data.schema import Problem
from megatron_metis.rewards.extract import answer_span, format_reward, last_boxed
from megatron_metis.rollout.client import RolloutClient, Scorer, strip_end_of_turn
from megatron_metis.rollout.engine import SamplingParams
from megatron_metis.stages.openai_client import OpenAIChatClient, RequestRejected
from megatron_metis.stages.runner import atomic_write_json, atomic_write_jsonl, atomic_write_text
from megatron_metis.stages.triage import sft_row

logger = logging.getLogger(__name__)

_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_TAG_RE = re.compile(r"</?(?:think|answer)>")
_FINAL_LINE_RE = re.compile(
    r"(?:^|\n)[^\n]*?(?:final answer|answer)\s*(?:is|:)\s*(?P<ans>[^\n]+?)\s*\.?\s*$",
    re.IGNORECASE,
)
REJECT_REASONS = (
    "no_candidate",
    "request_error",
    "no_answer",
    "no_reasoning",
    "bad_format",
    "wrong_answer",
)


@dataclass
class Proposals:
    """Candidates per problem id, ids whose request failed (with the redacted error), and the
    source's request counters for this call (``openai``: requests sent, retries, cache hits,
    failures; empty for the other sources)."""

    candidates: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)


class ExpertSource(Protocol):
    """Anything that proposes expert responses for problems."""

    name: str

    def propose(self, problems: Sequence[Problem]) -> Proposals: ...


class FileExpert:
    """Responses from a JSONL file: rows ``{"id", "response"}`` or ``{"id", "responses": [..]}``
    (several rows with one id add candidates)."""

    name = "file"

    def __init__(self, path: str | Path) -> None:
        self.by_id: dict[str, list[str]] = {}
        with Path(path).open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "id" not in row:
                    raise ValueError(f"{path}: line {line_no} has no 'id'")
                texts = row.get("responses") or [row.get("response")]
                self.by_id.setdefault(str(row["id"]), []).extend(str(t) for t in texts if t)

    def propose(self, problems: Sequence[Problem]) -> Proposals:
        return Proposals(candidates={p.id: list(self.by_id.get(p.id, [])) for p in problems})


class SolverExpert:
    """The problem's own ``expert`` field (written by the synthetic tasks' solver)."""

    name = "solver"

    def propose(self, problems: Sequence[Problem]) -> Proposals:
        return Proposals(candidates={p.id: [p.expert] if p.expert else [] for p in problems})


class LocalModelExpert:
    """``params.n`` samples per problem from a local model through its ``RolloutClient``."""

    name = "local"

    def __init__(self, client: RolloutClient, params: SamplingParams):
        self.client = client
        self.params = params

    def propose(self, problems: Sequence[Problem]) -> Proposals:
        if not problems:
            return Proposals()
        out = Proposals(candidates={p.id: [] for p in problems})
        for c in self.client.generate(problems, self.params):
            out.candidates[problems[c.request_index].id].append(strip_end_of_turn(c.text))
        return out


class OpenAIExpert:
    """Chat completions from an OpenAI-compatible endpoint (images as base64 data URLs).

    Retryable failures that outlast the retries raise (``ChatError``): the stage stops and a
    re-run resumes from the client's cache. A request the server refuses outright (4xx) is
    recorded as a ``request_error`` reject and the stage goes on.
    """

    name = "openai"

    def __init__(self, client: OpenAIChatClient, *, system_prompt: str, num_samples: int = 1):
        self.client = client
        self.system_prompt = system_prompt
        self.num_samples = num_samples

    def messages(self, problem: Problem) -> list[dict[str, Any]]:
        """System prompt + user turn (images first, then the question and its choices)."""
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        if not problem.images:
            messages.append({"role": "user", "content": question_text(problem)})
            return messages
        parts: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": _data_url(img)}}
            for img in problem.load_images()
        ]
        parts.append({"type": "text", "text": question_text(problem)})
        messages.append({"role": "user", "content": parts})
        return messages

    def propose(self, problems: Sequence[Problem]) -> Proposals:
        out = Proposals()
        before = dict(self.client.stats)
        for i, problem in enumerate(problems):
            try:
                out.candidates[problem.id] = self.client.chat(
                    self.messages(problem), n=self.num_samples
                )
            except RequestRejected as err:
                out.candidates[problem.id] = []
                out.errors[problem.id] = str(err)
            if (i + 1) % 50 == 0:
                logger.info("expert: %d / %d prompts (%s)", i + 1, len(problems), self.client.stats)
        out.requests = {k: v - before[k] for k, v in self.client.stats.items()}
        return out


def _data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def build_expert_source(
    cfg: ExpertConfig,
    *,
    system_prompt: str,
    cache_dir: Path,
    local_model: RolloutClient | None = None,
    local_params: SamplingParams | None = None,
) -> ExpertSource:
    """The source chosen by ``cfg.source`` (``local`` needs the loaded model and its params)."""
    if cfg.source == "file":
        return FileExpert(cfg.file)
    if cfg.source == "solver":
        return SolverExpert()
    if cfg.source == "openai":
        client = OpenAIChatClient(cfg, cache_dir=Path(cfg.cache_dir or cache_dir))
        return OpenAIExpert(client, system_prompt=system_prompt, num_samples=cfg.num_samples)
    if cfg.source == "local":
        if local_model is None or local_params is None:
            raise ValueError("expert.source=local needs the loaded local model and its params")
        return LocalModelExpert(local_model, local_params)
    raise ValueError(f"unknown expert source {cfg.source!r}")


def normalize_trajectory(text: str) -> tuple[str | None, str]:
    """Put a response into ``<think> R </think><answer> A </answer>`` with a boxed answer.

    Already well-formed text (format reward 1) is returned unchanged. Otherwise the reasoning
    is the ``<think>`` content (else the text before the answer), and the answer the
    ``<answer>`` span, else the last ``\\boxed{}``, else a final "answer is X" / "Answer: X"
    line; an answer without a box is boxed. The gold answer is never looked at.

    Returns:
        (normalized text, "ok"), or (None, reason) with reason ``no_answer`` / ``no_reasoning``.
    """
    text = strip_end_of_turn(text).strip()
    if format_reward(text) == 1.0:
        return text, "ok"
    answer, reasoning = _split_answer(text)
    if answer is None:
        return None, "no_answer"
    think = _THINK_RE.search(text)
    if think is not None:
        reasoning = think.group(1)
    reasoning = _TAG_RE.sub(" ", reasoning).strip()
    if not reasoning:
        return None, "no_reasoning"
    return (
        f"<think> {reasoning} </think><answer> The answer is $\\boxed{{{answer}}}$ </answer>",
        "ok",
    )


def _split_answer(text: str) -> tuple[str | None, str]:
    """(answer text without box, text before the answer)."""
    span = answer_span(text)
    if span is not None:
        before = text[: text.rfind("<answer>")]
        boxed = last_boxed(span)
        answer = boxed if boxed is not None else _strip_lead_in(span)
        return (answer.strip() or None), before
    at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        line_start = text.rfind("\n", 0, at) + 1
        return boxed.strip(), text[:line_start] if line_start > 0 else text[:at]
    match = _FINAL_LINE_RE.search(text)
    if match is not None:
        return match.group("ans").strip().strip("$").strip() or None, text[: match.start()]
    return None, text


def _strip_lead_in(span: str) -> str:
    return re.sub(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*", "", span, flags=re.I)


@dataclass
class ExpertOutcome:
    """Accepted SFT rows, rejects and counters of one expert stage."""

    rows: list[dict[str, Any]]
    rejects: list[dict[str, Any]]
    report: dict[str, Any]


def verify_candidates(
    problems: Sequence[Problem],
    proposals: Proposals,
    scorer: Scorer,
    *,
    keep_per_prompt: int,
    source: str,
    out_file: Path,
) -> ExpertOutcome:
    """Normalise and verify every candidate; keep up to ``keep_per_prompt`` per problem."""
    jobs: list[tuple[Problem, int, str]] = []
    rejects: list[dict[str, Any]] = []
    n_changed = 0
    for p in problems:
        cands = proposals.candidates.get(p.id, [])
        if not cands:
            reason = "request_error" if p.id in proposals.errors else "no_candidate"
            rejects.append(
                {
                    "id": p.id,
                    "candidate": -1,
                    "reason": reason,
                    "text": proposals.errors.get(p.id, ""),
                }
            )
        for j, raw in enumerate(cands):
            norm, reason = normalize_trajectory(raw)
            if norm is None:
                rejects.append({"id": p.id, "candidate": j, "reason": reason, "text": raw[:500]})
                continue
            n_changed += norm != raw
            jobs.append((p, j, norm))
    batch = scorer.score(
        [t for _, _, t in jobs],
        [p.answer for p, _, _ in jobs],
        choices=[p.choices for p, _, _ in jobs],
    )
    rows: list[dict[str, Any]] = []
    kept: Counter[str] = Counter()
    for (p, j, norm), acc, fmt in zip(jobs, batch.accuracy, batch.format, strict=True):
        if acc < 1.0 or fmt < 1.0:
            reason = "wrong_answer" if acc < 1.0 else "bad_format"
            rejects.append({"id": p.id, "candidate": j, "reason": reason, "text": norm[:500]})
        elif kept[p.id] < keep_per_prompt:
            kept[p.id] += 1
            row = sft_row(p, norm, origin="expert", tag=f"e{j}", out_file=out_file)
            rows.append({**row, "expert_source": source})
    n_candidates = sum(len(proposals.candidates.get(p.id, [])) for p in problems)
    report = expert_report(
        problems,
        rows,
        rejects,
        n_candidates=n_candidates,
        n_changed=n_changed,
        source=source,
        requests=proposals.requests,
    )
    return ExpertOutcome(rows=rows, rejects=rejects, report=report)


def expert_report(
    problems: Sequence[Problem],
    rows: Sequence[Mapping[str, Any]],
    rejects: Sequence[Mapping[str, Any]],
    *,
    n_candidates: int,
    n_changed: int,
    source: str,
    requests: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Counts: prompts, prompts with an accepted trajectory, candidates, rejects by reason, and
    the source's request counters (``Proposals.requests``)."""
    solved = {r["problem_id"] for r in rows}
    by_category: dict[str, dict[str, int]] = {}
    for p in problems:
        entry = by_category.setdefault(p.category or "(none)", {"prompts": 0, "solved": 0})
        entry["prompts"] += 1
        entry["solved"] += p.id in solved
    reasons = Counter(r["reason"] for r in rejects)
    return {
        "source": source,
        "num_prompts": len(problems),
        "prompts_solved": len(solved),
        "prompts_unsolved": len(problems) - len(solved),
        "candidates": n_candidates,
        "normalized": n_changed,
        "accepted": len(rows),
        "rejected": {reason: reasons[reason] for reason in REJECT_REASONS},
        "by_category": dict(sorted(by_category.items())),
        "requests": dict(requests or {}),
    }


def expert_markdown(report: Mapping[str, Any]) -> str:
    """The expert report as Markdown."""
    lines = [
        "# Expert augmentation",
        "",
        f"Source: {report['source']}. {report['num_prompts']} prompts with pass rate 0, "
        f"{report['prompts_solved']} got a verified expert trajectory.",
        "",
        "| candidates | reformatted | accepted |",
        "|---:|---:|---:|",
        f"| {report['candidates']} | {report['normalized']} | {report['accepted']} |",
        "",
        "| reject reason | count |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v} |" for k, v in report["rejected"].items()]
    if report["requests"]:
        lines += ["", "| request counter | count |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in report["requests"].items()]
    lines += ["", "| category | prompts | solved |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['prompts']} | {v['solved']} |" for k, v in report["by_category"].items()]
    return "\n".join(lines) + "\n"


def run_expert(
    problems: Sequence[Problem],
    source: ExpertSource,
    scorer: Scorer,
    *,
    keep_per_prompt: int,
    out_dir: str | Path,
) -> dict[str, Any]:
    """The expert stage into ``out_dir``: propose, normalise, verify, write rows and report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proposals = source.propose(problems)
    outcome = verify_candidates(
        problems,
        proposals,
        scorer,
        keep_per_prompt=keep_per_prompt,
        source=source.name,
        out_file=out / "expert.jsonl",
    )
    atomic_write_jsonl(out / "expert.jsonl", outcome.rows)
    atomic_write_jsonl(out / "rejects.jsonl", outcome.rejects)
    atomic_write_json(out / "report.json", outcome.report)
    atomic_write_text(out / "report.md", expert_markdown(outcome.report))
    return outcome.report
