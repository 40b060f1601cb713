"""How one Megatron tensor is made of Hugging Face tensors, and how it is split over TP ranks.

Each ``Layout`` turns HF tensors into the TP shard of a Megatron tensor (reading only the needed
slices from disk) and turns a TP shard back into its pieces of the HF tensors. Pieces of all TP
ranks concatenated along ``hf_split_dim`` give the full HF tensors. Shape legend: ``V`` vocab,
``H`` hidden, ``F`` MLP width, ``d`` head dim, ``nq``/``nkv`` query/KV heads, ``tp`` TP size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_metis.checkpoint.hf_io import HFCheckpointReader


@dataclass(frozen=True)
class ShardSpec:
    """The numbers a layout needs to cut or join shards."""

    tp: int
    tp_rank: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int


def _rows(total: int, spec: ShardSpec) -> slice:
    per_rank = total // spec.tp
    return slice(spec.tp_rank * per_rank, (spec.tp_rank + 1) * per_rank)


class Layout:
    """Base: a tensor replicated on every TP rank."""

    hf_split_dim: int | None = None

    def load(self, reader: HFCheckpointReader, hf_names: list[str], spec: ShardSpec):
        (name,) = hf_names
        return reader.read(name)

    def unshard(self, shard: torch.Tensor, spec: ShardSpec) -> list[torch.Tensor]:
        return [shard]

    def finish(self, full: list[torch.Tensor], spec: ShardSpec) -> list[torch.Tensor]:
        """Post-process the concatenated HF tensors (e.g. drop vocab padding)."""
        return full


class Replicated(Layout):
    pass


class SplitColumns(Layout):
    """Row-parallel linear (``o_proj``, ``down_proj``): each rank holds a block of input columns."""

    hf_split_dim = 1

    def load(self, reader, hf_names, spec):
        (name,) = hf_names
        return reader.read(name, cols=_rows(reader.shape(name)[1], spec))


class VocabRows(Layout):
    """Embedding / output layer: vocab rows padded to ``padded_vocab_size``, split by rank."""

    hf_split_dim = 0

    def load(self, reader, hf_names, spec):
        (name,) = hf_names
        per_rank = spec.padded_vocab_size // spec.tp
        start = spec.tp_rank * per_rank
        stop = min(start + per_rank, spec.vocab_size)
        shape = reader.shape(name)
        out = torch.zeros((per_rank, *shape[1:]), dtype=_dtype_of(reader, name))
        if stop > start:
            out[: stop - start] = reader.read(name, rows=slice(start, stop))
        return out

    def finish(self, full, spec):
        return [full[0][: spec.vocab_size]]


class FusedQKV(Layout):
    """``linear_qkv`` (weight [(nq+2nkv)d, H] or bias): Q, K, V interleaved per KV group.

    Megatron stores, for each KV head g: its ``nq/nkv`` query heads, then k_g, then v_g. A plain
    contiguous split over TP ranks then gives each rank whole KV groups.
    """

    hf_split_dim = 0

    def load(self, reader, hf_names, spec):
        q_name, k_name, v_name = hf_names
        groups = spec.num_kv_heads // spec.tp
        q_rows = groups * (spec.num_heads // spec.num_kv_heads) * spec.head_dim
        kv_rows = groups * spec.head_dim
        r = spec.tp_rank
        q = reader.read(q_name, rows=slice(r * q_rows, (r + 1) * q_rows))
        k = reader.read(k_name, rows=slice(r * kv_rows, (r + 1) * kv_rows))
        v = reader.read(v_name, rows=slice(r * kv_rows, (r + 1) * kv_rows))
        return merge_qkv(q, k, v, groups)

    def unshard(self, shard, spec):
        groups = spec.num_kv_heads // spec.tp
        return list(split_qkv(shard, groups, spec.num_heads // spec.num_kv_heads, spec.head_dim))


class GateUp(Layout):
    """``linear_fc1`` = [gate; up]; each TP rank holds [gate shard; up shard]."""

    hf_split_dim = 0

    def load(self, reader, hf_names, spec):
        gate_name, up_name = hf_names
        rows = _rows(reader.shape(gate_name)[0], spec)
        return torch.cat([reader.read(gate_name, rows=rows), reader.read(up_name, rows=rows)], 0)

    def unshard(self, shard, spec):
        return list(shard.chunk(2, dim=0))


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q [nq*d, ...], k/v [nkv*d, ...] (for ``groups`` KV heads) -> Megatron's grouped QKV."""
    tail = q.shape[1:]
    q = q.reshape(groups, -1, *tail)
    k = k.reshape(groups, -1, *tail)
    v = v.reshape(groups, -1, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, groups: int, q_per_group: int, head_dim: int):
    """Inverse of ``merge_qkv``: -> (q, k, v) in HF row order."""
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, (q_per_group + 2) * head_dim, *tail)
    q_len = q_per_group * head_dim
    q = grouped[:, :q_len].reshape(-1, *tail)
    k = grouped[:, q_len : q_len + head_dim].reshape(-1, *tail)
    v = grouped[:, q_len + head_dim :].reshape(-1, *tail)
    return q, k, v


def _dtype_of(reader: HFCheckpointReader, name: str) -> torch.dtype:
    return reader.read(name, rows=slice(0, 1)).dtype


REPLICATED = Replicated()
SPLIT_COLUMNS = SplitColumns()
VOCAB_ROWS = VocabRows()
FUSED_QKV = FusedQKV()
GATE_UP = GateUp()
