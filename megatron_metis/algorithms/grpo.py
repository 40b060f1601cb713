"""The GRPO variant of Metis-RISE as pure tensor functions (tensors in, ``(loss, metrics)`` out).

Pieces, composed by ``GRPOConfig``:
    group_advantages       (R - mean) / (std + eps) per group, or R - mean (Dr. GRPO)
    reward shaping         DAPO soft overlong penalty, or masking truncated responses
    filter_groups          drop groups whose rewards are all equal; ``DynamicSampler`` refills
    clipped_policy_loss    PPO-clip with asymmetric bounds (clip-higher), token_mean | seq_mean
    kl_penalty             k1 / k2 / k3 estimators against a reference model (coefficient 0
                           by default: then no reference model is needed at all)
    grpo_loss              the sum of the two, with the metrics of both

Normalisation is global: the loss of a micro-batch is a *partial sum* divided by normalisers
the caller counts over all micro-batches and data-parallel ranks of the batch
(``num_global_tokens`` for token_mean, ``num_global_seqs`` for seq_mean; see
``local_loss_normalisers``). Summing the micro-batch losses (and the DP ranks' gradients)
gives exactly the loss of the whole batch, whatever the micro-batch split. This is the one
GRPO objective: the trainer applies it to log-probs from the logits or from the fused kernel
(``megatron_metis.kernels.fused_logprob.fused_linear_logprob``, which holds no loss); the
kernel tests run it over the fused and the reference log-probs (values and gradients).

Per-token tensors may be flat ``[T]`` (packed sequences; ``seq_ids_T`` says which sequence
each token belongs to) or padded ``[S, T]`` (one row per sequence; ``seq_ids`` not needed).

Legend: B prompts (groups), G responses per group, N = B * G responses, S sequences in a
micro-batch, T tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import torch

from megatron_metis.algorithms.aggregation import LossAgg, aggregate
from megatron_metis.config.rl import GRPOConfig

KLEstimator = Literal["k1", "k2", "k3"]
Item = TypeVar("Item")


def group_advantages(
    rewards_BG: torch.Tensor, *, eps: float = 1e-6, norm_std: bool = True
) -> torch.Tensor:
    """Group-normalised advantages, one per response.

    ``(R - mean_g R) / (std_g R + eps)`` with the unbiased (Bessel) standard deviation, as in
    GRPO / DAPO reference code; ``norm_std=False`` gives Dr. GRPO's ``R - mean_g R``. A group
    whose rewards are all equal gets advantage 0 (its std is 0, ``eps`` keeps it finite).

    Args:
        rewards_BG: rewards, one row per prompt.
        eps: added to the standard deviation.
        norm_std: divide by the standard deviation.

    Returns:
        ``adv_BG`` in fp32.
    """
    if rewards_BG.dim() != 2 or rewards_BG.shape[1] < 2:
        raise ValueError(f"rewards must be [B, G] with G >= 2, got {tuple(rewards_BG.shape)}")
    rewards_BG = rewards_BG.float()
    centred_BG = rewards_BG - rewards_BG.mean(dim=1, keepdim=True)
    if not norm_std:
        return centred_BG
    return centred_BG / (rewards_BG.std(dim=1, keepdim=True) + eps)


def overlong_penalty(
    lengths_N: torch.Tensor, *, max_new_tokens: int, buffer_tokens: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment, a reward term <= 0.

    0 up to ``max_new_tokens - buffer_tokens`` tokens, then linear down to ``-factor`` at
    ``max_new_tokens`` (and ``-factor`` beyond).
    """
    start = max_new_tokens - buffer_tokens
    over_N = (lengths_N.float() - start).clamp(min=0.0) / float(buffer_tokens)
    return -factor * over_N.clamp(max=1.0)


def shape_rewards(
    rewards_N: torch.Tensor,
    lengths_N: torch.Tensor,
    truncated_N: torch.Tensor,
    *,
    cfg: GRPOConfig,
    max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Apply ``cfg.overlong`` to the verifier rewards of N responses.

    Returns:
        ``(rewards_N, loss_keep_N, metrics)``: shaped rewards; False where a response must be
        left out of the loss (``overlong='mask'`` and truncated); ``num_truncated``,
        ``num_masked`` and ``mean_overlong_penalty``.
    """
    rewards_N = rewards_N.float()
    truncated_N = truncated_N.bool()
    keep_N = torch.ones_like(truncated_N)
    penalty_N = torch.zeros_like(rewards_N)
    if cfg.overlong == "penalty":
        penalty_N = overlong_penalty(
            lengths_N,
            max_new_tokens=max_new_tokens,
            buffer_tokens=cfg.overlong_buffer_tokens,
            factor=cfg.overlong_penalty_factor,
        )
    elif cfg.overlong == "mask":
        keep_N = ~truncated_N
    metrics = {
        "num_truncated": float(truncated_N.sum()),
        "num_masked": float((~keep_N).sum()),
        "mean_overlong_penalty": float(penalty_N.mean()) if penalty_N.numel() else 0.0,
    }
    return rewards_N + penalty_N, keep_N, metrics


def filter_groups(rewards_BG: torch.Tensor, *, tol: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Dynamic-sampling filter: keep the groups whose rewards are not all equal.

    A group with equal rewards has zero advantage everywhere and contributes no gradient.

    Args:
        rewards_BG: rewards, one row per prompt.
        tol: rewards within ``tol`` of each other count as equal.

    Returns:
        ``(keep_B, metrics)``: a bool mask and ``groups``, ``groups_kept``, ``groups_dropped``.
    """
    spread_B = rewards_BG.max(dim=1).values - rewards_BG.min(dim=1).values
    keep_B = spread_B > tol
    kept = int(keep_B.sum())
    metrics = {
        "groups": rewards_BG.shape[0],
        "groups_kept": kept,
        "groups_dropped": rewards_BG.shape[0] - kept,
    }
    return keep_B, metrics


@dataclass
class DynamicSampler(Generic[Item]):
    """Accumulates kept groups over sampling rounds until the batch is full (bounded rounds).

    Use::

        sampler = DynamicSampler(target_groups=cfg.num_prompts_per_step,
                                 max_rounds=cfg.max_sampling_rounds,
                                 enabled=cfg.dynamic_sampling)
        while not sampler.done:
            groups, rewards_BG = generate_and_score(sampler.groups_needed)
            sampler.add(groups, rewards_BG)
        groups, rewards_BG, metrics = sampler.take()   # may be short, even empty

    ``Item`` is whatever the caller keeps per group (its responses, tokens, rewards...).
    """

    target_groups: int
    max_rounds: int
    enabled: bool = True
    tol: float = 0.0
    _items: list[Item] = field(default_factory=list)
    _rewards: list[torch.Tensor] = field(default_factory=list)
    _rounds: int = 0
    _sampled: int = 0
    _dropped: int = 0

    def __post_init__(self) -> None:
        if self.target_groups < 1 or self.max_rounds < 1:
            raise ValueError("target_groups and max_rounds must be >= 1")

    @property
    def groups_needed(self) -> int:
        """Groups still missing from the batch."""
        return max(self.target_groups - len(self._items), 0)

    @property
    def done(self) -> bool:
        """The batch is full, or the rounds are used up."""
        return self.groups_needed == 0 or self._rounds >= self.max_rounds

    def add(
        self,
        items: Sequence[Item],
        rewards_BG: torch.Tensor,
        *,
        filter_BG: torch.Tensor | None = None,
    ) -> dict[str, int]:
        """Add one round of sampled groups; returns the filter's metrics for this round.

        ``filter_BG``: the values whose equality within a group drops it (default: the rewards;
        the verifier accuracies for an accuracy filter).
        """
        if len(items) != rewards_BG.shape[0]:
            raise ValueError(f"{len(items)} groups but rewards for {rewards_BG.shape[0]}")
        filter_BG = rewards_BG if filter_BG is None else filter_BG
        if filter_BG.shape != rewards_BG.shape:
            raise ValueError(f"filter values {tuple(filter_BG.shape)} != {tuple(rewards_BG.shape)}")
        self._rounds += 1
        self._sampled += len(items)
        if self.enabled:
            keep_B, metrics = filter_groups(filter_BG, tol=self.tol)
        else:
            keep_B = torch.ones(len(items), dtype=torch.bool)
            metrics = {"groups": len(items), "groups_kept": len(items), "groups_dropped": 0}
        self._dropped += metrics["groups_dropped"]
        for b in torch.nonzero(keep_B).flatten().tolist():
            self._items.append(items[b])
            self._rewards.append(rewards_BG[b])
        return metrics

    def take(self) -> tuple[list[Item], torch.Tensor, dict[str, float]]:
        """The batch (at most ``target_groups`` groups), their rewards and the metrics.

        Metrics: ``sampling_rounds``, ``groups_sampled``, ``groups_dropped``, ``groups_kept``,
        ``groups_surplus`` (kept but beyond the target), ``batch_full`` (1/0).
        """
        items = self._items[: self.target_groups]
        rewards = self._rewards[: self.target_groups]
        rewards_BG = torch.stack(rewards) if rewards else torch.zeros(0, 0)
        metrics = {
            "sampling_rounds": float(self._rounds),
            "groups_sampled": float(self._sampled),
            "groups_dropped": float(self._dropped),
            "groups_kept": float(len(items)),
            "groups_surplus": float(len(self._items) - len(items)),
            "batch_full": float(len(items) == self.target_groups),
        }
        return items, rewards_BG, metrics


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    loss_agg: LossAgg = "token_mean",
    num_global_tokens: float | None = None,
    num_global_seqs: float | None = None,
    seq_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss with asymmetric bounds: ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)``.

    ``r = exp(logprobs - old_logprobs)``; ``advantages`` is per token (broadcast a response's
    advantage over its tokens). Where the clipped branch is the minimum the gradient is 0:
    A > 0 and r > 1 + eps_high, or A < 0 and r < 1 - eps_low.

    Returns:
        ``(loss, metrics)``: this micro-batch's partial loss (see ``aggregate``) and detached
        means over its valid tokens: ``clip_frac``, ``clip_frac_high``, ``clip_frac_low``,
        ``ratio_mean``, ``ratio_max``, ``num_tokens``.
    """
    ratio = torch.exp(logprobs.float() - old_logprobs.float())
    adv = advantages.float()
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    loss = aggregate(
        per_token,
        mask,
        loss_agg=loss_agg,
        num_global_tokens=num_global_tokens,
        num_global_seqs=num_global_seqs,
        seq_ids=seq_ids,
    )
    with torch.no_grad():
        valid = mask.bool()
        denom = valid.sum().clamp(min=1).float()
        ratio_d = ratio.detach()
        metrics = {
            "clip_frac": ((clipped < unclipped) & valid).sum() / denom,
            "clip_frac_high": ((ratio_d > 1.0 + eps_high) & (adv > 0) & valid).sum() / denom,
            "clip_frac_low": ((ratio_d < 1.0 - eps_low) & (adv < 0) & valid).sum() / denom,
            "ratio_mean": (ratio_d * valid).sum() / denom,
            "ratio_max": torch.where(valid, ratio_d, 0.0).max()
            if valid.numel()
            else ratio_d.new_zeros(()),
            "num_tokens": valid.sum().float(),
        }
    return loss, metrics


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    With ``d = ref_logprobs - logprobs``: k1 = ``-d``, k2 = ``d^2 / 2``,
    k3 = ``exp(d) - d - 1`` (unbiased and >= 0; GRPO's choice).
    """
    delta = ref_logprobs.float() - logprobs.float()
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta.square()
    if estimator == "k3":
        return torch.expm1(delta) - delta
    raise ValueError(f"kl estimator must be k1, k2 or k3, got {estimator!r}")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cfg: GRPOConfig,
    num_global_tokens: float | None = None,
    num_global_seqs: float | None = None,
    seq_ids: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss plus ``cfg.kl_coef`` times the KL penalty, aggregated alike.

    ``ref_logprobs`` is needed only when ``cfg.kl_coef > 0``. Metrics are those of
    ``clipped_policy_loss`` plus ``pg_loss`` and, with a KL term, ``kl`` (token mean).
    """
    norms = dict(
        loss_agg=cfg.loss_agg,
        num_global_tokens=num_global_tokens,
        num_global_seqs=num_global_seqs,
        seq_ids=seq_ids,
    )
    pg_loss, metrics = clipped_policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        **norms,
    )
    metrics["pg_loss"] = pg_loss.detach()
    if cfg.kl_coef == 0.0:
        return pg_loss, metrics
    if ref_logprobs is None:
        raise ValueError("grpo.kl_coef > 0 needs ref_logprobs")
    kl = kl_penalty(logprobs, ref_logprobs, estimator=cfg.kl_estimator)
    kl_loss = aggregate(kl, mask, **norms)
    valid = mask.bool()
    metrics["kl"] = ((kl.detach() * valid).sum() / valid.sum().clamp(min=1)).float()
    return pg_loss + cfg.kl_coef * kl_loss, metrics
