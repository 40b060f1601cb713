"""Config sections of the stages around training: triage, expert augmentation, evaluation and
the pipeline (RL -> triage -> expert -> SFT -> eval, optionally several rounds)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_metis.config.loader import ConfigError


@dataclass(kw_only=True, frozen=True)
class TriageConfig:
    num_samples: int = 8
    """Responses sampled per training prompt from the RL model (the paper's N)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 0
    """0: ``rollout.max_new_tokens``."""
    keep: Literal["all", "random", "shortest"] = "all"
    """Which verified-correct trajectories of a 0 < p < 1 prompt become SFT targets:
    ``all`` (first ``k`` in sample order), ``random`` (``k`` drawn with ``seed``), ``shortest``
    (``k`` fewest tokens). ``shortest`` favours responses that skipped reasoning and still
    landed on the answer: on the tiny count task it kept enumerations missing shapes, and SFT
    on them lowered count accuracy (examples/README.md)."""
    k: int = 0
    """Most self-distilled trajectories kept per prompt; 0: no limit."""
    seed: int = 0
    """Seed of the sampling engine and of ``keep: random``."""
    prompts_per_batch: int = 16
    """Prompts per generate call; progress is saved after each batch (resume granularity)."""
    data_files: list[str] = field(default_factory=list)
    """Prompts to triage; empty: ``data.train_files``."""

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"triage.num_samples must be >= 1, got {self.num_samples}")
        if self.temperature < 0:
            raise ConfigError(f"triage.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"triage.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0 or self.k < 0:
            raise ConfigError("triage.max_new_tokens and triage.k must be >= 0")
        if self.prompts_per_batch < 1:
            raise ConfigError("triage.prompts_per_batch must be >= 1")


@dataclass(kw_only=True, frozen=True)
class ExpertConfig:
    source: Literal["file", "openai", "local", "solver"] = "solver"
    """Where p = 0 prompts get their trajectories: ``file`` (JSONL of ``{"id", "response"}``),
    ``openai`` (an OpenAI-compatible chat endpoint), ``local`` (an HF model through the rollout
    engine), ``solver`` (the ``expert`` field of the problem rows: the synthetic tasks'
    programmatic solver)."""
    file: str = ""
    """``source: file``: JSONL rows ``{"id": ..., "response": ...}`` (several rows per id are
    several candidates; ``responses: [...]`` is accepted too)."""
    base_url: str = ""
    """``source: openai``: e.g. ``https://api.openai.com/v1`` (``/chat/completions`` is added)."""
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (the key itself never goes in a
    recipe, a log or the cache). An unset variable sends no Authorization header."""
    max_retries: int = 5
    """Retries of one request after a 429, a 5xx, a timeout or a connection error."""
    backoff_s: float = 1.0
    """First retry delay; doubles each retry up to ``max_backoff_s`` (a Retry-After header
    wins when it is larger)."""
    max_backoff_s: float = 60.0
    requests_per_minute: float = 60.0
    """Client-side rate limit (request starts are spaced 60/rpm seconds); 0: unlimited."""
    timeout_s: float = 120.0
    temperature: float = 0.0
    max_tokens: int = 4096
    num_samples: int = 1
    """Candidates asked per prompt (``openai``: ``n``; ``local``: samples); the first that
    verifies is kept. More than 1 needs ``temperature`` > 0."""
    cache_dir: str = ""
    """On-disk cache of endpoint answers (the resume point); empty: ``<stage dir>/cache``."""
    local_hf_dir: str = ""
    """``source: local``: HF folder of the expert model (built with the ``rollout`` section)."""
    keep_per_prompt: int = 1
    """Most verified expert trajectories kept per prompt."""

    def validate(self) -> None:
        if self.source == "file" and not self.file:
            raise ConfigError("expert.file is required with expert.source=file")
        if self.source == "openai" and not (self.base_url and self.model):
            raise ConfigError("expert.base_url and expert.model are required with source=openai")
        if self.source == "local" and not self.local_hf_dir:
            raise ConfigError("expert.local_hf_dir is required with expert.source=local")
        if self.max_retries < 0 or self.requests_per_minute < 0:
            raise ConfigError("expert.max_retries and expert.requests_per_minute must be >= 0")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.timeout_s <= 0:
            raise ConfigError("expert.backoff_s/max_backoff_s must be >= 0, timeout_s > 0")
        for key in ("max_tokens", "num_samples", "keep_per_prompt"):
            if getattr(self, key) < 1:
                raise ConfigError(f"expert.{key} must be >= 1, got {getattr(self, key)}")
        # Greedy samples are all alike, and vLLM (its server and its engine) refuses n > 1 at
        # temperature 0 with a 400: every prompt would end as a request_error reject.
        if self.source in ("openai", "local") and self.num_samples > 1 and self.temperature == 0:
            raise ConfigError("expert.num_samples > 1 needs expert.temperature > 0")


@dataclass(kw_only=True, frozen=True)
class EvalConfig:
    mode: Literal["greedy", "sampled"] = "greedy"
    """``greedy``: one temperature-0 response per problem; ``sampled``: ``num_samples``
    responses at ``temperature``, reporting mean accuracy and unbiased pass@k."""
    num_samples: int = 8
    """Responses per problem in ``sampled`` mode (n of the pass@k estimator)."""
    pass_k: list[int] = field(default_factory=lambda: [1])
    """k values of pass@k (each <= num_samples) in ``sampled`` mode."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 0
    """0: ``rollout.max_new_tokens``."""
    seed: int = 0
    prompts_per_batch: int = 32
    datasets: list[str] = field(default_factory=list)
    """Dataset files to evaluate (name = file stem); empty: ``data.test_files``."""

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"eval.num_samples must be >= 1, got {self.num_samples}")
        if not self.pass_k or any(k < 1 or k > self.num_samples for k in self.pass_k):
            raise ConfigError(
                f"eval.pass_k values must be in [1, eval.num_samples={self.num_samples}], "
                f"got {self.pass_k}"
            )
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError("eval.temperature must be >= 0 and eval.top_p in (0, 1]")
        if self.mode == "sampled" and self.temperature == 0:
            raise ConfigError("eval.mode=sampled needs eval.temperature > 0")
        if self.max_new_tokens < 0 or self.prompts_per_batch < 1:
            raise ConfigError("eval.max_new_tokens must be >= 0, eval.prompts_per_batch >= 1")


@dataclass(kw_only=True, frozen=True)
class PipelineConfig:
    rl_recipe: str = ""
    """Recipe of the RL phase (its optimizer, grpo, rollout and train sections); the pipeline
    sets its ``run.output_dir`` and ``model.hf_dir``. Relative paths: from the working dir."""
    sft_recipe: str = ""
    """Recipe of the targeted SFT phase; the pipeline sets ``run.output_dir``, ``model.hf_dir``,
    ``data.train_files`` (the SFT mix) and ``sft.response_field``."""
    warmup_recipe: str = ""
    """Optional SFT before everything (the tiny demo's stand-in for an instruct model): its
    exported policy becomes the base model. Empty: ``model.hf_dir`` is the base."""
    rl_overrides: list[str] = field(default_factory=list)
    """Dotted overrides applied to the RL recipe (e.g. ``train.max_steps=20``)."""
    sft_overrides: list[str] = field(default_factory=list)
    warmup_overrides: list[str] = field(default_factory=list)
    warmup_train_files: list[str] = field(default_factory=list)
    """Training data of the warm-up (an instruct model is trained on other data than the RL
    prompts); empty: ``data.train_files``."""
    rounds: int = 1
    """RL -> SFT rounds; > 1 runs the paper's future-work iteration (round r starts RL from
    round r-1's SFT checkpoint)."""
    expert_fraction: float = -1.0
    """Share of expert rows in the SFT mix. < 0: keep every self-distilled and expert row;
    in [0, 1]: the larger side is subsampled (seeded) so that expert / total = this."""
    max_sft_samples: int = 0
    """Cap on the SFT mix after mixing (seeded subsample keeping the ratio); 0: no cap."""
    seed: int = 0
    eval_stages: list[Literal["base", "rl", "rl_sft"]] = field(
        default_factory=lambda: ["base", "rl", "rl_sft"]
    )
    """Checkpoints evaluated by the pipeline (the ablation table's rows)."""

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"pipeline.rounds must be >= 1, got {self.rounds}")
        if self.expert_fraction > 1.0:
            raise ConfigError(
                f"pipeline.expert_fraction must be <= 1 (< 0: keep all), got {self.expert_fraction}"
            )
        if self.max_sft_samples < 0:
            raise ConfigError("pipeline.max_sft_samples must be >= 0")
