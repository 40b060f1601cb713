"""Triton backend: tiled ``hidden @ weight.T`` with ``tl.dot`` and fp32 accumulation.

Forward (``_stats_fwd_kernel``): a grid of (token blocks x vocabulary splits); each program
walks its split in ``BLOCK_V`` columns, builds each ``[BLOCK_T, BLOCK_V]`` logits tile with a
loop of ``tl.dot`` over H, and keeps an online max / sum-exp / sum p*z / target logit per
row. The splits' partial stats merge exactly in ``stats.merge_stats``, the same code that
merges tensor-parallel ranks, so no ``[T, V]`` tensor exists, not even in chunks.

Backward (``_grad_logits_kernel``): for one chunk of C tokens, a grid of ``[BLOCK_T,
BLOCK_V]`` tiles recomputes the logits with ``tl.dot`` and writes d loss / d logits into a
``[C, V]`` buffer (input dtype); two GEMMs then give ``grad_hidden[chunk] = d @ W`` and
``grad_weight += d.T @ hidden[chunk]`` with fp32 accumulation. Accumulating both gradients
inside the kernel would need, at H = 3584, a read-modify-write (or atomics) of the ``[T, H]``
and ``[V, H]`` fp32 gradients for every tile: about ``T * V * H * 8 / BLOCK`` bytes, ~100x
the GEMMs' traffic; the bounded buffer plus cuBLAS is the standard answer (Liger, verl).

Under ``TRITON_INTERPRET=1`` (CPU) bf16 ``tl.dot`` is wrong (triton-lang/triton#11584), so
the tiles are upcast to fp32 there (``UPCAST``) and smaller blocks are used.

Legend: T tokens, C tokens per backward chunk, H hidden size, V this rank's valid columns.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .stats import NUM_STATS, empty_stats, merge_stats

# Tokens per backward chunk: the [C, V] gradient buffer stays near 64 Mi elements.
_BUFFER_ELEMENTS = 1 << 26


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _blocks(device: torch.device) -> dict[str, int]:
    if _interpreting() or device.type != "cuda":
        return {"BLOCK_T": 32, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 4}
    return {"BLOCK_T": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3}


def _compile_flags(dtype: torch.dtype) -> dict[str, object]:
    """fp32 inputs get IEEE fp32 dots (not TF32); bf16/fp16 tiles feed tensor cores as is."""
    fp32 = dtype == torch.float32
    return {
        "UPCAST": _interpreting() and not fp32,
        "PRECISION": "ieee" if fp32 else "tf32",
    }


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``[BLOCK_T, BLOCK_V]`` fp32 tile of hidden @ weight.T."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        a = tl.load(
            h_ptr + rows[:, None] * stride_h + offs_h[None, :],
            mask=row_ok[:, None] & h_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + cols[None, :] * stride_w + offs_h[:, None],
            mask=col_ok[None, :] & h_ok[:, None],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _stats_fwd_kernel(
    h_ptr, w_ptr, tgt_ptr, stats_ptr, T, V, H, cols_per_split, inv_temp, stride_h, stride_w,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    ENTROPY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Partial stats (max, sum-exp, sum p*(z-max), target logit) of one split, ``[4, T]``."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_T,), -1.0e30, tl.float32)
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    w = tl.zeros((BLOCK_T,), dtype=tl.float32)
    t = tl.zeros((BLOCK_T,), dtype=tl.float32)
    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logits_tile(
            h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
            BLOCK_T, BLOCK_V, BLOCK_H, UPCAST, PRECISION,
        ) * inv_temp  # fmt: skip
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        if ENTROPY:
            z_shift = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
            w = alpha * (w + (m - m_new) * s) + tl.sum(p * z_shift, axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
        t += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = stats_ptr + pid_s * 4 * T + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + T, s, mask=row_ok)
    tl.store(out + 2 * T, w, mask=row_ok)
    tl.store(out + 3 * T, t, mask=row_ok)


@triton.jit
def _grad_logits_kernel(
    h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, d_ptr,
    T, V, H, inv_temp, stride_h, stride_w, stride_d,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    ENTROPY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One tile of d loss / d logits: ``g_lp (onehot - p) - g_H p (log p + H)``, over temp."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < T
    col_ok = cols < V
    z = _logits_tile(
        h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
        BLOCK_T, BLOCK_V, BLOCK_H, UPCAST, PRECISION,
    ) * inv_temp  # fmt: skip
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    glp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    d = -p * glp[:, None]
    if ENTROPY:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        gent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        d -= gent[:, None] * p * (logp + ent[:, None])
    d += tl.where(cols[None, :] == tgt[:, None], glp[:, None], 0.0)
    d = d * inv_temp
    tl.store(
        d_ptr + rows[:, None] * stride_d + cols[None, :],
        d.to(d_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def _num_splits(num_token_blocks: int, num_col_blocks: int, device: torch.device) -> int:
    """Vocabulary splits so that the forward grid has about two programs per SM."""
    if device.type != "cuda":
        return min(2, num_col_blocks)
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(num_col_blocks, triton.cdiv(2 * num_sms, num_token_blocks)))


def local_stats(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    local_targets_T: torch.Tensor,
    *,
    inv_temp: float,
    compute_entropy: bool,
    chunk_size: int | None,
) -> torch.Tensor:
    """This rank's ``[4, T]`` stats; same contract as ``chunked.local_stats``."""
    del chunk_size  # the forward holds no logits buffer at all
    num_tokens, hidden_size = hidden_TH.shape
    num_cols = weight_VH.shape[0]
    if num_cols == 0 or num_tokens == 0:
        return empty_stats(num_tokens, hidden_TH.device)
    blocks = _blocks(hidden_TH.device)
    num_token_blocks = triton.cdiv(num_tokens, blocks["BLOCK_T"])
    num_col_blocks = triton.cdiv(num_cols, blocks["BLOCK_V"])
    num_splits = _num_splits(num_token_blocks, num_col_blocks, hidden_TH.device)
    cols_per_split = triton.cdiv(num_col_blocks, num_splits) * blocks["BLOCK_V"]
    num_splits = triton.cdiv(num_cols, cols_per_split)
    stats_N4T = torch.empty(
        num_splits, NUM_STATS, num_tokens, dtype=torch.float32, device=hidden_TH.device
    )
    _stats_fwd_kernel[(num_token_blocks, num_splits)](
        hidden_TH, weight_VH, local_targets_T, stats_N4T,
        num_tokens, num_cols, hidden_size, cols_per_split, inv_temp,
        hidden_TH.stride(0), weight_VH.stride(0),
        ENTROPY=compute_entropy, **_compile_flags(hidden_TH.dtype), **blocks,
    )  # fmt: skip
    return merge_stats(stats_N4T)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result; bf16/fp16 operands keep fp32 accumulation on CUDA."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # builds without the fp32-output bf16 GEMM
            pass
    return a.float() @ b.float()


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
    """``(grad_hidden_TH, grad_weight_VH)`` in fp32; same contract as ``chunked.local_grads``."""
    num_tokens, hidden_size = hidden_TH.shape
    num_cols = weight_VH.shape[0]
    grad_hidden_TH = torch.zeros(hidden_TH.shape, dtype=torch.float32, device=hidden_TH.device)
    grad_weight_VH = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device)
    if num_cols == 0 or num_tokens == 0:
        return grad_hidden_TH, grad_weight_VH
    blocks = _blocks(hidden_TH.device)
    chunk = chunk_size or max(blocks["BLOCK_T"], _BUFFER_ELEMENTS // num_cols)
    chunk = min(chunk, num_tokens)
    grad_logits_CV = torch.empty(chunk, num_cols, dtype=hidden_TH.dtype, device=hidden_TH.device)
    entropy = grad_entropy_T is not None
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        rows = end - start
        grid = (triton.cdiv(rows, blocks["BLOCK_T"]), triton.cdiv(num_cols, blocks["BLOCK_V"]))
        _grad_logits_kernel[grid](
            hidden_TH[start:end], weight_VH, local_targets_T[start:end], lse_T[start:end],
            entropy_T[start:end] if entropy else lse_T, grad_logprobs_T[start:end],
            grad_entropy_T[start:end] if entropy else lse_T, grad_logits_CV,
            rows, num_cols, hidden_size, inv_temp,
            hidden_TH.stride(0), weight_VH.stride(0), grad_logits_CV.stride(0),
            ENTROPY=entropy, **_compile_flags(hidden_TH.dtype), **blocks,
        )  # fmt: skip
        d_CV = grad_logits_CV[:rows]
        grad_hidden_TH[start:end] = _mm_f32(d_CV, weight_VH)
        grad_weight_VH += _mm_f32(d_CV.T, hidden_TH[start:end])
    return grad_hidden_TH, grad_weight_VH
