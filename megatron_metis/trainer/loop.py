"""The phase loop that ``metis rl`` and ``metis sft`` share.

A phase (``rl.RLPhase``, ``sft.SFTPhase``) supplies its own setup, its state and its ``step``;
this loop owns the rest: the runtime and resume (``setup.build_runtime``), the exit stack of
the phase's resources, the metrics logger, held-out evaluation every ``train.eval_interval``
steps, a training checkpoint every ``checkpoint.save_interval`` steps (both also at the last
step) and the Hugging Face export at the end (``checkpoint.export_hf``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Literal, Protocol

from megatron_metis.config import MetisConfig
from megatron_metis.data import Problem, load_problems
from megatron_metis.trainer.checkpointing import export_hf, save_train_checkpoint
from megatron_metis.trainer.metrics import MetricsLogger
from megatron_metis.trainer.setup import Runtime, build_runtime
from megatron_metis.trainer.state import TrainState


class Phase(Protocol):
    """What a phase gives the loop."""

    total_steps: int
    """Steps of the phase (``TrainState.step`` counts them); the last one is the end."""

    def initial_state(self) -> TrainState:
        """The state of a fresh start (a resumed run continues from its checkpoint's)."""
        ...

    def start(self) -> None:
        """Once before the first step (RL: stream the policy into the rollout engine)."""
        ...

    def step(self, state: TrainState) -> dict[str, float]:
        """One step: advances ``state`` and returns the step's metrics."""
        ...

    def evaluate(self, problems: Sequence[Problem]) -> dict[str, float]:
        """Held-out accuracy of the current policy (``eval/*`` metrics)."""
        ...


PhaseBuilder = Callable[[Runtime, ExitStack, Sequence[Problem]], Phase]
"""(runtime, exit stack for the phase's resources, held-out problems) -> the phase."""


def run_phase(
    cfg: MetisConfig,
    *,
    name: Literal["rl", "sft"],
    build: PhaseBuilder,
    total_updates: int = 0,
) -> dict[str, float]:
    """Run a phase to its last step (call on every rank); returns the last step's metrics.

    Args:
        cfg: the run's config.
        name: the phase, as checkpoints and metrics name it.
        build: makes the phase once the runtime is up (its resources go on the exit stack).
        total_updates: optimizer steps of the phase (the learning-rate schedule), when known
            before the phase is built.
    """
    rt, resumed = build_runtime(cfg, phase=name, total_steps=total_updates)
    with ExitStack() as stack:
        test_problems = load_test_problems(rt)
        phase = build(rt, stack, test_problems)
        state = resumed or phase.initial_state()
        logger = MetricsLogger(
            cfg.run.output_dir,
            cfg.logging,
            phase=name,
            total_steps=phase.total_steps,
            initial_step=state.step,
            enabled=rt.is_logger,
        )
        phase.start()
        metrics: dict[str, float] = {}
        while state.step < phase.total_steps:
            metrics = phase.step(state)
            last = state.step == phase.total_steps
            if test_problems and due(cfg.train.eval_interval, state.step, last=last):
                metrics.update(phase.evaluate(test_problems))
            logger.log(state.step, metrics, force=last)
            if due(cfg.checkpoint.save_interval, state.step, last=last):
                save_train_checkpoint(
                    rt.engine,
                    state,
                    cfg.run.output_dir,
                    hf_dir=rt.hf_dir,
                    keep_last=cfg.checkpoint.keep_last,
                )
        logger.close()
        if cfg.checkpoint.export_hf:
            export_hf(
                rt.engine,
                cfg.run.output_dir,
                hf_dir=rt.hf_dir,
                max_shard_size_mb=cfg.checkpoint.max_shard_size_mb,
            )
    return metrics


def due(interval: int, step: int, *, last: bool) -> bool:
    """Whether an every-``interval``-steps action (0: never) runs after ``step``: always after
    the last step."""
    return last or bool(interval and step % interval == 0)


def load_test_problems(rt: Runtime) -> list[Problem]:
    """The held-out problems of in-loop evaluation (``data.test_files``, the first
    ``train.eval_max_problems``); none without test files."""
    cfg = rt.cfg
    if not cfg.data.test_files:
        return []
    loaded = load_problems(list(cfg.data.test_files), cfg.data, rt.tokenizer)
    return loaded.problems[: cfg.train.eval_max_problems or len(loaded.problems)]
