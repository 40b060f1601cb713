"""Benchmark the core attention of Megatron's local layers: Megatron-Core's ``DotProductAttention``
(scores materialised, mask filled, unfused softmax) against ``SdpaDotProductAttention``
(``torch.nn.functional.scaled_dot_product_attention``, what the local spec now uses).

Forward + backward of ``sum(out * g)`` on packed rows (block-causal masks, as the SFT and RL
updates build them), median of ``--repeat`` runs after one warm-up; the maximum difference of the
outputs is printed too. The defaults are one micro-batch of the tiny demo model: 8 packed rows of
512 tokens, 4 query heads in 2 groups of head dim 32.

Example:
    python tools/bench_attention.py --batch 8 --seq 512 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_metis.algorithms.packing import block_causal_mask, cu_seqlens_from_lengths
from megatron_metis.config import ParallelConfig
from megatron_metis.models.local_attention import SdpaDotProductAttention
from megatron_metis.parallel import init_parallel


def _packed_masks(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, 1, seq, seq] block-causal masks of rows packed with random-length samples."""
    masks = []
    for _ in range(batch):
        lengths, left = [], seq - int(torch.randint(0, 32, (1,), generator=gen))
        while left > 0:
            n = min(left, int(torch.randint(40, 200, (1,), generator=gen)))
            lengths.append(n)
            left -= n
        masks.append(block_causal_mask(cu_seqlens_from_lengths(lengths), seq)[0])
    return torch.stack(masks)


def _time(module, q, k, v, mask, g, repeat: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for i in range(repeat + 1):
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        start = time.perf_counter()
        out = module(qq, kk, vv, mask)
        (out * g).sum().backward()
        if i:  # the first run warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times), out.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    init_parallel(ParallelConfig(tp=1, pp=1, cp=1, timeout_s=60))
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=args.heads * args.head_dim,
        num_attention_heads=args.heads,
        num_query_groups=args.groups,
        kv_channels=args.head_dim,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    gen = torch.Generator().manual_seed(0)
    s, b = args.seq, args.batch
    q = torch.randn(s, b, args.heads, args.head_dim, generator=gen)
    k = torch.randn(s, b, args.groups, args.head_dim, generator=gen)
    v = torch.randn(s, b, args.groups, args.head_dim, generator=gen)
    g = torch.randn(s, b, args.heads * args.head_dim, generator=gen)
    mask = _packed_masks(b, s, gen)
    results = {}
    for name, cls in (("megatron", DotProductAttention), ("sdpa", SdpaDotProductAttention)):
        module = cls(cfg, 1, AttnMaskType.causal, "self")
        results[name] = _time(module, q, k, v, mask, g, args.repeat)
    print(
        f"batch={b} seq={s} heads={args.heads} groups={args.groups} head_dim={args.head_dim} "
        f"threads={torch.get_num_threads()} (forward + backward, median of {args.repeat})"
    )
    base = results["megatron"][0]
    for name, (seconds, _) in results.items():
        print(f"  {name:9s} {seconds * 1e3:8.2f} ms   {base / seconds:5.2f}x")
    diff = (results["sdpa"][1] - results["megatron"][1]).abs().max().item()
    print(f"  max |sdpa - megatron| of the outputs: {diff:.2e}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
