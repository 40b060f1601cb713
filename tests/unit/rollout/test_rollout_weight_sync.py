"""Weight streaming: one lazily consumed stream, the engine then holds the trainer's weights; a
corrupted tensor is caught by the checksum and by the log-prob probe."""

from __future__ import annotations

import pytest
import torch

from megatron_metis.models.tiny import TinyTextSizes, init_tiny_model, tiny_qwen2_5_vl_config
from megatron_metis.rollout.engine import TensorChecksum, tensor_checksum
from megatron_metis.rollout.hf_engine import HFRolloutEngine
from megatron_metis.rollout.weight_sync import (
    WeightSyncError,
    check_logprobs,
    stream_weights,
)


class CorruptingEngine:
    """Fault injection: passes everything to ``inner`` but perturbs one tensor it loads."""

    def __init__(self, inner: HFRolloutEngine, target: str) -> None:
        self.inner, self.target = inner, target
        self.weight_dtype = inner.weight_dtype

    def load_weights(self, named_tensors):
        self.inner.load_weights((n, t + 1e-3 if n == self.target else t) for n, t in named_tensors)

    def checksum(self, names) -> list[TensorChecksum]:
        return self.inner.checksum(names)


def _probe(tok) -> list[int]:
    msgs = [{"role": "user", "content": "Compute 3 + 4."}, {"role": "assistant", "content": "7"}]
    return tok.apply_chat_template(msgs)["input_ids"]


def _trainer_logprobs(model, seq) -> torch.Tensor:
    ids = torch.tensor([seq])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)


def _stream(model):
    """What the trainer streams: (HF name, full tensor), one at a time."""
    for name, tensor in model.state_dict().items():
        yield name, tensor.detach().clone()


class RecordingEngine:
    """Records when each tensor of the stream is pulled, relative to ``load_weights`` calls."""

    weight_dtype = torch.float32

    def __init__(self, stop_after: int | None = None) -> None:
        self.calls, self.pulled, self.stop_after = 0, [], stop_after

    def load_weights(self, named_tensors):
        self.calls += 1
        for k, (name, _) in enumerate(named_tensors):
            self.pulled.append((self.calls, name))
            if self.stop_after is not None and k + 1 == self.stop_after:
                return


def test_the_stream_is_one_lazy_call():
    """vLLM processes a layer once all its tensors arrived: one call takes the whole stream,
    pulled one tensor at a time (the producer never has to hold two)."""
    produced = []

    def stream():
        for i, n in enumerate([10, 20, 30, 100]):
            produced.append(i)
            assert len(produced) == len(engine.pulled) + 1  # pulled as soon as produced
            yield f"t{i}", torch.zeros(n)

    engine = RecordingEngine()
    report = stream_weights(stream(), engine, verify="none")
    assert engine.pulled == [(1, "t0"), (1, "t1"), (1, "t2"), (1, "t3")]
    assert (report.num_tensors, report.total_bytes, report.max_tensor_bytes) == (4, 640, 400)


def test_an_engine_that_stops_reading_is_an_error():
    stream = ((f"t{i}", torch.zeros(2)) for i in range(5))
    with pytest.raises(WeightSyncError, match="left 3 tensors unread"):
        stream_weights(stream, RecordingEngine(stop_after=2), verify="none")


def test_stream_then_engine_logprobs_equal_the_trainers(tiny_tokenizer, tiny_model_factory):
    engine = HFRolloutEngine(tiny_model_factory(0), tiny_tokenizer)
    trainer_model = tiny_model_factory(1)
    seq = _probe(tiny_tokenizer)
    before = engine.score([seq])[0]
    assert (before - _trainer_logprobs(trainer_model, seq)).abs().max() > 0.1

    report = stream_weights(_stream(trainer_model), engine, verify="checksum")
    assert report.num_tensors == len(trainer_model.state_dict())
    embed_bytes = trainer_model.model.embed_tokens.weight.numel() * 4
    assert report.max_tensor_bytes == embed_bytes

    after = engine.score([seq])[0]
    torch.testing.assert_close(after, _trainer_logprobs(trainer_model, seq), rtol=0, atol=1e-6)
    assert check_logprobs(_trainer_logprobs(trainer_model, seq), after, atol=1e-6) <= 1e-6


def test_corrupted_tensor_is_caught_by_checksum(tiny_tokenizer, tiny_model_factory):
    target = "model.layers.1.mlp.down_proj.weight"
    engine = CorruptingEngine(HFRolloutEngine(tiny_model_factory(0), tiny_tokenizer), target)
    with pytest.raises(WeightSyncError, match=r"tensor 'model\.layers\.1\.mlp\.down_proj"):
        stream_weights(_stream(tiny_model_factory(1)), engine)


def test_corrupted_weights_are_caught_by_the_logprob_probe(tiny_tokenizer, tiny_model_factory):
    inner = HFRolloutEngine(tiny_model_factory(0), tiny_tokenizer)
    engine = CorruptingEngine(inner, "model.norm.weight")
    trainer_model = tiny_model_factory(1)
    stream_weights(_stream(trainer_model), engine, verify="none")
    seq = _probe(tiny_tokenizer)
    with pytest.raises(WeightSyncError, match="log-probs differ"):
        check_logprobs(_trainer_logprobs(trainer_model, seq), inner.score([seq])[0], atol=1e-5)


def test_checksum_sees_a_transposed_or_shifted_tensor():
    t = torch.arange(12.0).reshape(3, 4)
    ref = tensor_checksum("w", t)
    assert ref.matches(tensor_checksum("w", t.clone()))
    assert not ref.matches(tensor_checksum("w", t.flip(0)))  # same sum and sum of squares
    assert not ref.matches(tensor_checksum("w", t.T.contiguous()))


def test_unknown_name_or_shape_is_rejected(tiny_tokenizer, tiny_model_factory):
    engine = HFRolloutEngine(tiny_model_factory(0), tiny_tokenizer)
    with pytest.raises(KeyError, match="no weight named 'model.nope'"):
        engine.load_weights([("model.nope", torch.zeros(1))])
    with pytest.raises(ValueError, match="does not match"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))])


def test_vl_release_names_reach_the_transformers5_modules(tiny_tokenizer):
    sizes = TinyTextSizes(hidden_size=32, num_layers=1)
    config = tiny_qwen2_5_vl_config(
        tiny_tokenizer, sizes=sizes, vision_depth=1, vision_hidden_size=16
    )
    engine = HFRolloutEngine(init_tiny_model(config), tiny_tokenizer)
    names = [
        "model.layers.0.self_attn.q_proj.weight",  # release layout
        "visual.blocks.0.attn.qkv.weight",
        "lm_head.weight",
        "model.language_model.norm.weight",  # transformers-5 layout
    ]
    params = dict(engine.model.named_parameters(remove_duplicate=False))
    internal = [
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "model.visual.blocks.0.attn.qkv.weight",
        "lm_head.weight",
        "model.language_model.norm.weight",
    ]
    new = [torch.full_like(params[n], 0.5) for n in internal]
    engine.load_weights(zip(names, new, strict=True))
    for n in internal:
        assert torch.all(params[n] == 0.5), n
    assert [c.name for c in engine.checksum(names)] == names


def test_build_rollout_engine_from_a_hf_folder(tmp_path, tiny_tokenizer, tiny_model_factory):
    from megatron_metis.config.rl import RolloutConfig
    from megatron_metis.rollout import build_rollout_engine

    model = tiny_model_factory(1)
    model.save_pretrained(tmp_path / "full")
    tiny_tokenizer.save_pretrained(tmp_path / "full")
    model.config.save_pretrained(tmp_path / "bare")  # config only: random weights
    tiny_tokenizer.save_pretrained(tmp_path / "bare")
    cfg = RolloutConfig(dtype="float32", seed=3)
    seq = _probe(tiny_tokenizer)  # loaded models use sdpa attention: 1e-5, not 1e-6
    full = build_rollout_engine(cfg, tmp_path / "full")
    torch.testing.assert_close(
        full.score([seq])[0], _trainer_logprobs(model, seq), rtol=0, atol=1e-5
    )
    bare = build_rollout_engine(cfg, tmp_path / "bare")
    stream_weights(_stream(model), bare)
    torch.testing.assert_close(
        bare.score([seq])[0], _trainer_logprobs(model, seq), rtol=0, atol=1e-5
    )
