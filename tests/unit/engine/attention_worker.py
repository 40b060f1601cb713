"""Per-rank body of the local attention tests (module level, so ``spawn`` can pickle it)."""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_metis.algorithms.packing import block_causal_mask, cu_seqlens_from_lengths
from megatron_metis.config import ParallelConfig
from megatron_metis.models.local_attention import SdpaDotProductAttention
from megatron_metis.models.qwen2_5_vl import padding_attention_mask
from megatron_metis.parallel import init_parallel

SEQ, BATCH, HEADS, GROUPS, DIM = 10, 3, 4, 2, 8


def _config(**overrides) -> TransformerConfig:
    fields = dict(
        num_layers=1,
        hidden_size=HEADS * DIM,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=DIM,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def _masks() -> dict[str, torch.Tensor | None]:
    """Megatron boolean masks (True = masked): its default causal one, a packed row, and a
    left-padded batch whose padding rows have every key masked."""
    packed = block_causal_mask(cu_seqlens_from_lengths([4, 3, 2]), SEQ)  # 1 padding position
    keep_BS = torch.ones(BATCH, SEQ, dtype=torch.long)
    keep_BS[0, :3] = 0
    keep_BS[2, :6] = 0
    return {"causal": None, "packed": packed, "left_padded": padding_attention_mask(keep_BS)}


def _run(module, q, k, v, mask, grad_out):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = module(q, k, v, mask)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def compare_worker() -> dict:
    """Outputs and input gradients of Megatron's ``DotProductAttention`` and of the SDPA one, for
    each mask; plus the error raised for a config the SDPA module does not implement."""
    init_parallel(ParallelConfig(tp=1, pp=1, cp=1, timeout_s=60))
    torch.manual_seed(0)
    cfg = _config()
    ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    sdpa = SdpaDotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    q = torch.randn(SEQ, BATCH, HEADS, DIM)
    k = torch.randn(SEQ, BATCH, GROUPS, DIM)
    v = torch.randn(SEQ, BATCH, GROUPS, DIM)
    grad_out = torch.randn(SEQ, BATCH, HEADS * DIM)
    out: dict = {}
    for name, mask in _masks().items():
        out[name] = {"megatron": _run(ref, q, k, v, mask, grad_out)}
        out[name]["sdpa"] = _run(sdpa, q, k, v, mask, grad_out)
        out[name]["blind_rows"] = 0 if mask is None else int(mask.all(dim=-1).sum())
    try:
        SdpaDotProductAttention(
            _config(apply_query_key_layer_scaling=True, fp16=True, params_dtype=torch.float16),
            1,
            AttnMaskType.causal,
            "self",
        )
        out["unsupported"] = None
    except ValueError as err:
        out["unsupported"] = str(err)
    return out
