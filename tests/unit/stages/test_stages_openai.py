"""The OpenAI-compatible expert against a stub HTTP server on 127.0.0.1: errors, retries,
rate limit, cache, resume, and the API key kept out of logs, output and files."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from stage_helpers import problem, solved

from megatron_metis.config.stages import ExpertConfig
from megatron_metis.data.io import read_jsonl
from megatron_metis.stages.expert import OpenAIExpert, build_expert_source, run_expert
from megatron_metis.stages.openai_client import ChatError, OpenAIChatClient, RateLimiter

KEY = "sk-test-SECRET-0123456789"


class StubServer:
    """Chat-completions stub: answers from ``answers[question]``; ``plan`` is a list of
    statuses served first (one per request; 200 = answer normally)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.plan: list[int] = []
        self.answers: dict[str, str] = {}
        self.auth: list[str | None] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                stub.auth.append(self.headers.get("Authorization"))
                status = stub.plan.pop(0) if stub.plan else 200
                if status != 200:
                    # a careless server echoes the credentials in its error body
                    payload = {"error": f"failure; you sent {self.headers.get('Authorization')}"}
                    self._send(status, payload, {"Retry-After": "0"} if status == 429 else {})
                    return
                user = body["messages"][-1]["content"]
                text = user if isinstance(user, str) else user[-1]["text"]
                choices = [
                    {"index": i, "message": {"role": "assistant", "content": stub.answers[text]}}
                    for i in range(body.get("n", 1))
                ]
                self._send(200, {"choices": choices}, {})

            def _send(self, status, payload, headers):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    with StubServer() as s:
        yield s


def _cfg(url: str, **kw) -> ExpertConfig:
    base = dict(
        source="openai",
        base_url=url,
        model="stub-model",
        api_key_env="METIS_TEST_KEY",
        max_retries=3,
        backoff_s=0.01,
        max_backoff_s=0.05,
        requests_per_minute=0,
        timeout_s=5.0,
    )
    return ExpertConfig(**{**base, **kw})


def _problems():
    return [problem(f"p{i}", str(i + 2), question=f"What is {i} + 2?") for i in range(4)]


def _answer_all(server):
    for i in range(4):
        server.answers[f"What is {i} + 2?"] = f"{i} plus 2.\nThe answer is {i + 2}."


def _secret_free(tmp_path, caplog, capsys):
    texts = [caplog.text, *capsys.readouterr()]
    texts += [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    return all(KEY not in t for t in texts)


def test_retries_on_500_and_429_then_succeeds(tmp_path, server, monkeypatch, caplog, capsys):
    monkeypatch.setenv("METIS_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    _answer_all(server)
    server.plan = [500, 429, 503]
    source = build_expert_source(_cfg(server.url), system_prompt="SYS", cache_dir=tmp_path / "c")
    report = run_expert(
        _problems(), source, None or _Scorer(), keep_per_prompt=1, out_dir=tmp_path / "out"
    )
    assert report["accepted"] == 4
    assert len(server.requests) == 4 + 3
    assert source.client.stats == {"requests": 7, "retries": 3, "cache_hits": 0, "failures": 0}
    assert report["requests"] == source.client.stats  # the stage's report carries the counters
    assert server.auth[0] == f"Bearer {KEY}"  # the key is sent, in the header only
    first = server.requests[0]
    assert first["model"] == "stub-model" and first["messages"][0] == {
        "role": "system",
        "content": "SYS",
    }
    assert "retry 1" in caplog.text and "HTTP 500" in caplog.text and "***" in caplog.text
    assert _secret_free(tmp_path, caplog, capsys)


def test_cache_hit_on_rerun_and_resume_after_interruption(
    tmp_path, server, monkeypatch, caplog, capsys
):
    monkeypatch.setenv("METIS_TEST_KEY", KEY)
    _answer_all(server)
    cfg = _cfg(server.url, max_retries=1)
    # the endpoint goes down for good after two answers: the stage stops with an error
    server.plan = [200, 200, 500, 500]
    source = build_expert_source(cfg, system_prompt="S", cache_dir=tmp_path / "c")
    with pytest.raises(ChatError) as err:
        run_expert(_problems(), source, _Scorer(), keep_per_prompt=1, out_dir=tmp_path / "out")
    assert KEY not in str(err.value) and "***" in str(err.value)
    assert len(server.requests) == 4
    # resumed: only the two prompts not in the cache go to the server
    source = build_expert_source(cfg, system_prompt="S", cache_dir=tmp_path / "c")
    report = run_expert(_problems(), source, _Scorer(), keep_per_prompt=1, out_dir=tmp_path / "out")
    assert report["accepted"] == 4
    assert len(server.requests) == 6 and source.client.stats["cache_hits"] == 2
    # a full rerun is served from the cache
    source = build_expert_source(cfg, system_prompt="S", cache_dir=tmp_path / "c")
    run_expert(_problems(), source, _Scorer(), keep_per_prompt=1, out_dir=tmp_path / "out")
    assert len(server.requests) == 6 and source.client.stats["cache_hits"] == 4
    assert _secret_free(tmp_path, caplog, capsys)


def test_client_error_is_a_reject_not_a_retry(tmp_path, server, monkeypatch, caplog, capsys):
    monkeypatch.setenv("METIS_TEST_KEY", KEY)
    _answer_all(server)
    server.plan = [400]
    source = build_expert_source(_cfg(server.url), system_prompt="S", cache_dir=tmp_path / "c")
    report = run_expert(_problems(), source, _Scorer(), keep_per_prompt=1, out_dir=tmp_path / "o")
    assert len(server.requests) == 4
    assert report["rejected"]["request_error"] == 1 and report["accepted"] == 3
    assert _secret_free(tmp_path, caplog, capsys)


def test_wrong_expert_answers_never_reach_the_sft_rows(tmp_path, server, monkeypatch):
    monkeypatch.setenv("METIS_TEST_KEY", KEY)
    _answer_all(server)
    server.answers["What is 1 + 2?"] = solved("4")
    source = build_expert_source(
        _cfg(server.url, num_samples=2, temperature=1.0),
        system_prompt="S",
        cache_dir=tmp_path / "c",
    )
    report = run_expert(_problems(), source, _Scorer(), keep_per_prompt=1, out_dir=tmp_path / "o")
    assert server.requests[0]["n"] == 2
    assert report["rejected"]["wrong_answer"] == 2
    assert "p1" not in {r["problem_id"] for r in read_jsonl(tmp_path / "o" / "expert.jsonl")}


def test_images_are_sent_as_data_urls(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    p = problem("img", "1", images=(buf.getvalue(),), choices=("a", "b"))
    client = OpenAIChatClient(_cfg("http://127.0.0.1:9"), cache_dir=tmp_path, api_key="")
    messages = OpenAIExpert(client, system_prompt="").messages(p)
    parts = messages[0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1]["text"].endswith("A. a\nB. b")


def test_rate_limiter_spaces_requests():
    now = [0.0]
    slept: list[float] = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(120, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.wait()
    assert slept == pytest.approx([0.5, 0.5])
    now[0] += 10
    limiter.wait()
    assert len(slept) == 2


def test_rate_limit_applies_to_the_client(tmp_path, server, monkeypatch):
    monkeypatch.setenv("METIS_TEST_KEY", KEY)
    _answer_all(server)
    now = [0.0]
    slept: list[float] = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    client = OpenAIChatClient(
        _cfg(server.url, requests_per_minute=600),
        cache_dir=tmp_path,
        sleep=sleep,
        clock=lambda: now[0],
    )
    for i in range(3):
        client.chat([{"role": "user", "content": f"What is {i} + 2?"}])
    assert slept == pytest.approx([0.1, 0.1])


class _Scorer:
    """Main-thread verifier (the shared fixture is module-scoped in other files)."""

    def __init__(self):
        from megatron_metis.config.rewards import RewardConfig
        from megatron_metis.rewards.scorer import RewardScorer

        self._s = RewardScorer(RewardConfig(num_workers=0))

    def score(self, responses, golds, *, choices=None):
        return self._s.score(responses, golds, choices=choices)
