"""Memory-bounded PyTorch implementation (the CPU and fallback path).

Loops over chunks of tokens: each chunk's ``[C, V_local]`` logits are built, reduced to the
stats of ``stats.py`` and dropped; the backward recomputes them chunk by chunk and accumulates
the gradients of the hidden states and of the weight shard. Peak extra memory is about two
``[C, V_local]`` fp32 buffers plus an fp32 weight gradient. Math in fp32; reduced-precision
inputs are upcast (the weight once per call).

Legend: T tokens, C tokens per chunk, H hidden size, V this rank's valid vocabulary columns.
"""

from __future__ import annotations

import torch

from .stats import NUM_STATS, STAT_MAX, STAT_SUMEXP, STAT_TARGET, STAT_XLOGX, empty_stats

# Logits elements per chunk: 64 Mi fp32 = 256 MiB.
_CHUNK_ELEMENTS = 1 << 26


def auto_chunk_size(num_tokens: int, num_cols: int) -> int:
    """Tokens per chunk so that one ``[C, V]`` fp32 buffer stays near 256 MiB."""
    return max(16, min(num_tokens, _CHUNK_ELEMENTS // max(num_cols, 1)))


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def local_stats(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    local_targets_T: torch.Tensor,
    *,
    inv_temp: float,
    compute_entropy: bool,
    chunk_size: int | None,
) -> torch.Tensor:
    """This rank's ``[4, T]`` stats over the valid columns ``weight_VH`` (see ``stats.py``).

    ``local_targets_T`` holds the target's column in ``weight_VH``, or -1 when another rank
    (or nobody) holds it.
    """
    num_tokens = hidden_TH.shape[0]
    if weight_VH.shape[0] == 0:
        return empty_stats(num_tokens, hidden_TH.device)
    chunk = chunk_size or auto_chunk_size(num_tokens, weight_VH.shape[0])
    weight_VH = _f32(weight_VH)
    stats_4T = torch.zeros(NUM_STATS, num_tokens, dtype=torch.float32, device=hidden_TH.device)
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        z_CV = _f32(hidden_TH[start:end]) @ weight_VH.T
        z_CV.mul_(inv_temp)
        tgt_C = local_targets_T[start:end]
        owner_C = tgt_C >= 0
        tgt_logit_C = z_CV.gather(-1, tgt_C.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        stats_4T[STAT_TARGET, start:end] = torch.where(owner_C, tgt_logit_C, 0.0)
        max_C = z_CV.amax(dim=-1)
        stats_4T[STAT_MAX, start:end] = max_C
        z_CV.sub_(max_C.unsqueeze(-1))
        exp_CV = z_CV.exp()
        stats_4T[STAT_SUMEXP, start:end] = exp_CV.sum(dim=-1)
        if compute_entropy:
            stats_4T[STAT_XLOGX, start:end] = exp_CV.mul_(z_CV).sum(dim=-1)
        del z_CV, exp_CV
    return stats_4T


def grad_logits_(
    z_CV: torch.Tensor,
    local_targets_C: torch.Tensor,
    lse_C: torch.Tensor,
    entropy_C: torch.Tensor | None,
    grad_logprobs_C: torch.Tensor,
    grad_entropy_C: torch.Tensor | None,
) -> torch.Tensor:
    """Turn tempered logits (in place) into d loss / d z.

    d logp / d z_j = onehot_j - p_j and d H / d z_j = -p_j (log p_j + H).
    """
    logp_CV = z_CV.sub_(lse_C.unsqueeze(-1))
    p_CV = logp_CV.exp()
    if grad_entropy_C is not None:
        d_CV = logp_CV.add_(entropy_C.unsqueeze(-1)).mul_(p_CV).mul_(-grad_entropy_C.unsqueeze(-1))
        d_CV.sub_(p_CV.mul_(grad_logprobs_C.unsqueeze(-1)))
    else:
        d_CV = p_CV.mul_(-grad_logprobs_C.unsqueeze(-1))
    rows_R = torch.nonzero(local_targets_C >= 0).squeeze(-1)
    d_CV[rows_R, local_targets_C[rows_R]] += grad_logprobs_C[rows_R]
    return d_CV


def local_grads(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    local_targets_T: torch.Tensor,
    lse_T: torch.Tensor,
    entropy_T: torch.Tensor | None,
    grad_logprobs_T: torch.Tensor,
    grad_entropy_T: torch.Tensor | None,
    *,
    inv_temp: float,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of this rank's vocabulary shard: ``(grad_hidden_TH, grad_weight_VH)``.

    ``grad_hidden_TH`` is the partial sum over this rank's columns (fp32); ``grad_weight_VH``
    is fp32 too. The caller casts and reduces.
    """
    num_tokens = hidden_TH.shape[0]
    grad_hidden_TH = torch.zeros(hidden_TH.shape, dtype=torch.float32, device=hidden_TH.device)
    grad_weight_VH = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device)
    if weight_VH.shape[0] == 0:
        return grad_hidden_TH, grad_weight_VH
    chunk = chunk_size or auto_chunk_size(num_tokens, weight_VH.shape[0])
    weight_VH = _f32(weight_VH)
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        hidden_CH = _f32(hidden_TH[start:end])
        z_CV = (hidden_CH @ weight_VH.T).mul_(inv_temp)
        d_CV = grad_logits_(
            z_CV,
            local_targets_T[start:end],
            lse_T[start:end],
            None if entropy_T is None else entropy_T[start:end],
            grad_logprobs_T[start:end],
            None if grad_entropy_T is None else grad_entropy_T[start:end],
        )
        d_CV.mul_(inv_temp)
        torch.mm(d_CV, weight_VH, out=grad_hidden_TH[start:end])
        grad_weight_VH.addmm_(d_CV.T, hidden_CH)
        del z_CV, d_CV
    return grad_hidden_TH, grad_weight_VH
