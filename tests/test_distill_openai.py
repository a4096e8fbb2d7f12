"""The OpenAI-compatible backend against a local stub server (127.0.0.1 only): retries,
bounded concurrency, resumption, and the API key never leaking."""

import asyncio
import json
import logging
import secrets
import socket
import threading
from pathlib import Path

import pytest
from aiohttp import web

from data_pipelines import DataError
from data_pipelines.arith_task import evaluate, parse_problem
from data_pipelines.distill import DistillConfig, run_distill

KEY_ENV = "DISTILL_TEST_API_KEY"


class Stub:
    """Answers each distinct request with 503 the first time, then a correct R1-style reply."""

    def __init__(self):
        self.seen: set[str] = set()
        self.inflight = self.max_inflight = self.n503 = self.n200 = 0
        self.auth: set[str | None] = set()

    async def chat(self, request):
        body = await request.json()
        self.auth.add(request.headers.get("Authorization"))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await asyncio.sleep(0.02)  # long enough for requests to overlap
            key = json.dumps([body["messages"], body["seed"]], sort_keys=True)
            if key not in self.seen:
                self.seen.add(key)
                self.n503 += 1
                return web.Response(status=503, text="busy")
            self.n200 += 1
            problem = body["messages"][-1]["content"]
            answer = evaluate(*parse_problem(problem))
            reasoning = f"The numbers give {answer}. Check done (seed {body['seed']})."
            msg = {"role": "assistant", "content": f"The answer is \\boxed{{{answer}}}."}
            if body["seed"] % 2:  # reasoning servers send the CoT separately
                msg["reasoning_content"] = reasoning
            else:
                msg["content"] = f"<think>\n{reasoning}\n</think>\n\n" + msg["content"]
            return web.json_response({"choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
                                      "usage": {"prompt_tokens": 30, "completion_tokens": 12}})
        finally:
            self.inflight -= 1

    async def unauthorized(self, request):  # a careless server that echoes the header back
        return web.Response(status=401, text=f"bad key: {request.headers.get('Authorization')}")


@pytest.fixture()
def stub():
    state = Stub()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", state.chat)
    app.router.add_post("/bad/v1/chat/completions", state.unauthorized)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{port}"
    yield state
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.run_until_complete(runner.cleanup())
    loop.close()


@pytest.fixture()
def api_key(monkeypatch):
    key = "sk-test-" + secrets.token_hex(16)
    monkeypatch.setenv(KEY_ENV, key)
    return key


def _cfg(out, base, **kw):
    d = dict(dataset_name="builtin:arith?n_train=10", backend="openai", model_name_or_path="teacher-x",
             api_base=f"{base}/v1", api_key_env=KEY_ENV, max_concurrency=3, max_retries=3, retry_backoff=0.01,
             num_generations=3, shard_size=3, output_dir=str(out), disable_tqdm=True)
    d.update(kw)
    return DistillConfig(**d)


def _all_text(out: Path) -> str:
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in out.rglob("*") if p.is_file())


def test_retries_concurrency_resume_and_no_key_leak(stub, api_key, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "o"
    stats = run_distill(_cfg(out, stub.base))
    n = 10 * 3
    assert stub.n503 == n and stub.n200 == n  # every request failed once, then succeeded
    assert 1 < stub.max_inflight <= 3
    assert stub.auth == {f"Bearer {api_key}"}
    assert stats["samples"]["total"] == n and stats["samples"]["kept"] == n
    rows = [json.loads(line) for p in sorted((out / "data").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert len(rows) == n and all(r["completion_tokens"] == 12 and r["prompt_tokens"] == 30 for r in rows)
    assert all(r["messages"][-1]["content"].startswith("<think>\n") for r in rows)  # reasoning_content folded in
    assert rows[0]["teacher"] == f"openai:teacher-x@{stub.base}/v1"
    first = {p.name: p.read_bytes() for p in (out / "data").iterdir()}

    # Resume: forget the last two shards; only their prompts are requested again.
    ledger = (out / "ledger.jsonl").read_text().splitlines(keepends=True)
    (out / "ledger.jsonl").write_text("".join(ledger[:2]))
    before = stub.n200
    run_distill(_cfg(out, stub.base))
    assert stub.n200 - before == (10 - 2 * 3) * 3
    assert {p.name: p.read_bytes() for p in (out / "data").iterdir()} == first
    run_distill(_cfg(out, stub.base))  # complete: no requests at all
    assert stub.n200 - before == (10 - 2 * 3) * 3

    captured = capsys.readouterr()
    assert api_key not in _all_text(out)
    assert api_key not in caplog.text and api_key not in captured.out + captured.err
    assert "503" in caplog.text or "HTTP 503" in caplog.text  # the retries were logged (without the key)


def test_error_body_is_scrubbed(stub, api_key, tmp_path):
    with pytest.raises(DataError, match=r"returned HTTP 401") as e:
        run_distill(_cfg(tmp_path / "o", f"{stub.base}/bad"))
    assert api_key not in str(e.value) and "***" in str(e.value)
    assert api_key not in _all_text(tmp_path / "o")


def test_unreachable_endpoint_names_url(tmp_path, api_key):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(DataError, match=rf"http://127\.0\.0\.1:{port}/v1/chat/completions failed after 2 attempt.*cannot reach"):
        run_distill(_cfg(tmp_path / "o", f"http://127.0.0.1:{port}", max_retries=1))
    assert not list((tmp_path / "o" / "data").glob("*.jsonl"))


def test_missing_key_variable_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(DataError, match=f"environment variable {KEY_ENV}"):
        run_distill(_cfg(tmp_path / "o", "http://127.0.0.1:9"))
