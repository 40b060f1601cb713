"""Per-step metrics of a run: a JSONL file, TensorBoard and a progress bar, from rank 0 only.

``<run.output_dir>/metrics.jsonl`` gets one line per logged step:
``{"phase": "rl", "step": 3, "time": ..., "loss": ..., "reward/mean": ..., ...}``. A resumed
run appends; a step logged twice (killed after logging, before its checkpoint) appears twice
and the last line wins. TensorBoard event files go to ``<output_dir>/tensorboard``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from megatron_metis.config import LoggingConfig


class MetricsLogger:
    """Writes metrics on rank 0; a no-op elsewhere.

    Args:
        output_dir: the run's folder.
        cfg: the logging section.
        phase: ``sft`` or ``rl`` (prefix of TensorBoard tags, field of every JSONL line).
        total_steps: length of the progress bar.
        initial_step: steps already done (resume).
        enabled: True on the rank that writes (global rank 0).
    """

    def __init__(
        self,
        output_dir: str | Path,
        cfg: LoggingConfig,
        *,
        phase: str,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
    ) -> None:
        self.cfg, self.phase, self.enabled = cfg, phase, enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=initial_step, desc=phase, dynamic_ncols=True
            )

    def log(self, step: int, metrics: dict[str, Any], *, force: bool = False) -> None:
        """Record the metrics of ``step`` (every ``log_interval`` steps, or when forced)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            shown = {k: metrics[k] for k in ("loss", "reward/mean", "accuracy") if k in metrics}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        if not force and step % self.cfg.log_interval:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        if self.cfg.jsonl:
            line = {"phase": self.phase, "step": step, "time": time.time(), **clean}
            with self.path.open("a") as f:
                f.write(json.dumps(line) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                if isinstance(value, float) and math.isfinite(value):
                    self._tb.add_scalar(f"{self.phase}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int):
        return float(value)
    return value


def read_metrics(output_dir: str | Path, phase: str | None = None) -> dict[int, dict[str, Any]]:
    """The JSONL metrics of a run by step (the last line of a step wins)."""
    path = Path(output_dir) / "metrics.jsonl"
    out: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if phase is None or row.get("phase") == phase:
                out[int(row["step"])] = row
    return out
