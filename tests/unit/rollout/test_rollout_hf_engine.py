"""HFRolloutEngine on a tiny random Qwen2: determinism, stop / EOS / length, exact log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_metis.rollout.engine import RolloutRequest, SamplingParams
from megatron_metis.rollout.hf_engine import HFRolloutEngine


def _prompts(tok) -> list[RolloutRequest]:
    texts = ["Compute 3 + 4.", "How many red shapes are in the image?"]
    return [
        RolloutRequest(
            prompt_ids=tok.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True
            )["input_ids"],
            problem_id=f"p{i}",
        )
        for i, t in enumerate(texts)
    ]


def _manual_logprobs(model, prompt, completion, temperature) -> torch.Tensor:
    """Unpadded forward of one prompt + completion: log p of each completion token."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float() / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logp[-len(completion) :]


def _only_tokens(model, allowed: list[int]) -> None:
    """Replace the output layer by a bias-only one: uniform over ``allowed``, ~0 elsewhere."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[allowed] = 0.0
    model.lm_head = head


def test_generate_is_deterministic_given_a_seed(tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory(0)
    params = SamplingParams(max_new_tokens=8, n=2, temperature=0.9, top_p=0.95)
    runs = [
        HFRolloutEngine(model, tiny_tokenizer, seed=7).generate(_prompts(tiny_tokenizer), params)
        for _ in range(2)
    ]
    assert [c.token_ids for c in runs[0]] == [c.token_ids for c in runs[1]]
    assert [(c.request_index, c.sample_index, c.problem_id) for c in runs[0]] == [
        (0, 0, "p0"),
        (0, 1, "p0"),
        (1, 0, "p1"),
        (1, 1, "p1"),
    ]
    other = HFRolloutEngine(model, tiny_tokenizer, seed=8).generate(
        _prompts(tiny_tokenizer), params
    )
    assert [c.token_ids for c in other] != [c.token_ids for c in runs[0]]
    # the caller's RNG is untouched
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    HFRolloutEngine(model, tiny_tokenizer, seed=7).generate(_prompts(tiny_tokenizer), params)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_a_manual_forward(tiny_tokenizer, tiny_model_factory, temperature):
    model = tiny_model_factory(0)
    engine = HFRolloutEngine(model, tiny_tokenizer, seed=1, batch_size=3)
    requests = _prompts(tiny_tokenizer)
    params = SamplingParams(max_new_tokens=12, n=2, temperature=temperature)
    completions = engine.generate(requests, params)
    assert len(completions) == 4
    for c in completions:
        expected = _manual_logprobs(
            model, requests[c.request_index].prompt_ids, c.token_ids, temperature
        )
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, rtol=0, atol=1e-5)


def test_stops_at_the_stop_string(tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory(0)
    allowed = tiny_tokenizer.encode(" </answer>", add_special_tokens=False)  # 3 tokens
    assert len(allowed) == 3
    _only_tokens(model, allowed)
    engine = HFRolloutEngine(model, tiny_tokenizer, seed=0)
    params = SamplingParams(max_new_tokens=300, n=3, stop=("</answer>",))
    for c in engine.generate(_prompts(tiny_tokenizer)[:1], params):
        assert c.finish_reason == "stop" and not c.truncated
        assert c.text.endswith("</answer>") and c.text.count("</answer>") == 1
        assert len(c.token_ids) < 300
        # uniform over the 3 allowed tokens: every log-prob is log(1/3)
        assert c.logprobs == pytest.approx([-math.log(3)] * len(c.token_ids), abs=1e-6)


def test_stops_at_eos_and_reports_length_when_truncated(tiny_tokenizer, tiny_model_factory):
    model = tiny_model_factory(0)
    x, im_end = tiny_tokenizer.encode("x", add_special_tokens=False)[0], tiny_tokenizer.eos_token_id
    _only_tokens(model, [x, im_end])
    engine = HFRolloutEngine(model, tiny_tokenizer, seed=0)
    out = engine.generate(_prompts(tiny_tokenizer), SamplingParams(max_new_tokens=40, n=2))
    for c in out:
        assert c.finish_reason == "stop" and c.token_ids[-1] == im_end
        assert set(c.token_ids[:-1]) <= {x}
    _only_tokens(model, [x])
    out = engine.generate(_prompts(tiny_tokenizer), SamplingParams(max_new_tokens=6, n=2))
    for c in out:
        assert c.finish_reason == "length" and c.truncated
        assert c.token_ids == [x] * 6 and c.text == "x" * 6


def test_greedy_and_sleep(tiny_tokenizer, tiny_model_factory):
    engine = HFRolloutEngine(tiny_model_factory(0), tiny_tokenizer, seed=0)
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    a = engine.generate(_prompts(tiny_tokenizer), params)
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(_prompts(tiny_tokenizer), params)
    engine.wake()
    b = HFRolloutEngine(tiny_model_factory(0), tiny_tokenizer, seed=99).generate(
        _prompts(tiny_tokenizer), params
    )
    assert [c.token_ids for c in a] == [c.token_ids for c in b]  # greedy ignores the seed


def test_vl_logprobs_use_the_image_m_rope_positions(tmp_path):
    """Qwen2.5-VL image requests (84 px: a 3x3 grid of image tokens, and a text-only one in
    the same batch): the engine's log-probs equal transformers' forward given the processor's
    ``mm_token_type_ids``, i.e. the M-RoPE positions the trainer uses. Without them
    transformers 5 gives image tokens 1-D positions (a 0.3 nat/token gap on a trained model)."""
    from PIL import Image, ImageDraw
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from megatron_metis.data.schema import Problem
    from megatron_metis.data.vl_inputs import build_vl_processor, encode_problems
    from megatron_metis.models.tiny import build_tiny_qwen2_5_vl

    hf_dir = build_tiny_qwen2_5_vl(tmp_path / "tiny", hidden_size=64, num_layers=2)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    processor = build_vl_processor(tok, min_pixels=56 * 56, max_pixels=112 * 112)
    image = Image.new("RGB", (84, 84), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((4, 4, 40, 40), fill=(220, 40, 40))
    problems = [
        Problem(
            id="img", question="How many red shapes are in the image?", answer="1", images=(image,)
        ),
        Problem(id="txt", question="Compute 3 + 4.", answer="7"),
    ]
    requests = []
    for problem in problems:
        batch = encode_problems(processor, [problem], system_prompt="")
        mm = None
        if batch.pixel_values_PC is not None:
            mm = {"pixel_values": batch.pixel_values_PC, "image_grid_thw": batch.image_grid_thw_N3}
        requests.append((batch, RolloutRequest(batch.input_ids_BS[0].tolist(), mm_inputs=mm)))
    engine = HFRolloutEngine(model, tok, seed=0, processor=processor)
    completions = engine.generate(
        [r for _, r in requests], SamplingParams(temperature=1.0, max_new_tokens=12, n=2)
    )
    assert requests[0][0].image_grid_thw_N3.tolist() == [[1, 6, 6]]
    for c in completions:
        batch, _ = requests[c.request_index]
        ids = torch.cat([batch.input_ids_BS, torch.tensor([c.token_ids])], dim=1)
        types = torch.cat(
            [batch.mm_token_type_ids_BS, torch.zeros(1, len(c.token_ids), dtype=torch.long)], 1
        )
        kwargs = {}
        if batch.pixel_values_PC is not None:
            kwargs = dict(
                pixel_values=batch.pixel_values_PC,
                image_grid_thw=batch.image_grid_thw_N3,
                mm_token_type_ids=types,
            )
        with torch.no_grad():
            logits = model(input_ids=ids, **kwargs).logits[0, :-1].float()
        ref = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        ref = ref[-len(c.token_ids) :]
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=2e-5, rtol=0)
