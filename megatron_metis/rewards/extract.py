"""Answer extraction from a response and the format reward (pure string code, linear time)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT_RE = re.compile(r"\s*<think>(.+?)</think>\s*<answer>(.+?)</answer>\s*", re.DOTALL)
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_LEAD_IN_RE = re.compile(
    r"^\s*(?:the\s+)?(?:final\s+|correct\s+)?answer\s*(?:is|:)\s*", re.IGNORECASE
)


@dataclass(frozen=True)
class Candidate:
    """The answer a response gives.

    Attributes:
        text: the answer itself (content of the last ``\\boxed{}``, else the answer span without
            a lead-in such as "The answer is"), used by the exact fast paths.
        verifier_input: what math-verify parses (``\\boxed{text}`` or the raw answer span).
    """

    text: str
    verifier_input: str


def last_boxed(text: str, *, max_tries: int = 4) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``) with balanced braces, else None.

    Only the last ``max_tries`` box commands are tried, which keeps garbage input linear.
    """
    end = len(text)
    for _ in range(max_tries):
        start, cmd = max((text.rfind(c, 0, end), c) for c in _BOX_COMMANDS)
        if start < 0:
            return None
        rest = start + len(cmd)
        brace = rest + len(text[rest : rest + 8]) - len(text[rest : rest + 8].lstrip())
        if brace < len(text) and text[brace] == "{":
            close = _matching_brace(text, brace)
            if close is not None:
                return text[brace + 1 : close]
        end = start
    return None


def _matching_brace(text: str, open_at: int) -> int | None:
    depth = 0
    for i in range(open_at, len(text)):
        char = text[i]
        if char == "{" and text[i - 1] != "\\":
            depth += 1
        elif char == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return i
    return None


def answer_span(response: str) -> str | None:
    """Text of the last ``<answer>...</answer>``; after the last open ``<answer>`` when unclosed."""
    spans = _ANSWER_RE.findall(response)
    if spans:
        return spans[-1]
    at = response.rfind("<answer>")
    return response[at + len("<answer>") :] if at >= 0 else None


def extract_candidate(response: str) -> Candidate | None:
    """The answer of ``response``: its ``<answer>`` span (its last box if any), else its last box.

    A response with neither an answer span nor a box has no answer (None): it scores 0.
    """
    span = answer_span(response)
    source = response if span is None else span
    boxed = last_boxed(source)
    if boxed is not None:
        text = boxed.strip()
        return Candidate(text=text, verifier_input=f"\\boxed{{{text}}}") if text else None
    if span is None or not span.strip():
        return None
    text = _LEAD_IN_RE.sub("", span.strip()).strip()
    return Candidate(text=text, verifier_input=span)


def format_reward(response: str) -> float:
    """1.0 when ``response`` is exactly one ``<think>...</think>`` followed by one
    ``<answer>...</answer>`` whose content holds a non-empty ``\\boxed{}``; else 0.0."""
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        if response.count(tag) != 1:
            return 0.0
    match = _FORMAT_RE.fullmatch(response)
    if match is None or not match.group(1).strip():
        return 0.0
    boxed = last_boxed(match.group(2))
    return 1.0 if boxed is not None and boxed.strip() else 0.0
