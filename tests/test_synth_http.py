"""The OpenAI-compatible HTTP generator against a real server on loopback, and crash-safe resumption of a
synthesis run killed with SIGKILL."""


import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from synth_workspace import read_jsonl, write_corpus

from engrain.clients.openai_http import OpenAIHTTPGenerator
from engrain.errors import EngrainError


def _grounded_reply(messages: list[dict]) -> str:
    """A scripted writer that only restates its prompt's text, so every reply is grounded."""
    last = messages[-1]["content"]
    if "whose answer is" in last:
        return "Which detail does this sentence give?"
    m = re.search(r"Text: (.*?)(?:\n\n|$)", last, flags=re.S)
    return m.group(1).strip() if m else last


class ScriptedServer:
    """A FastAPI app implementing /v1/chat/completions, served by uvicorn in a thread."""

    def __init__(self, fail_first: list[int] | None = None, delay: float = 0.0, tiny_lm=None) -> None:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse

        self.fail_first = list(fail_first or [])
        self.requests, self.delay, self.lock = 0, delay, threading.Lock()
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            with self.lock:
                self.requests += 1
                status = self.fail_first.pop(0) if self.fail_first else 200
            if status != 200:
                return JSONResponse({"error": {"message": "scripted failure"}}, status_code=status,
                                    headers={"Retry-After": "0"} if status == 429 else {})
            if self.delay:
                time.sleep(self.delay)
            if body.get("model") == "forbidden":
                return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
            if tiny_lm is not None:
                from engrain.models import chat_prompt, generate

                g = generate(tiny_lm, [chat_prompt(tiny_lm.tokenizer, body["messages"])],
                             max_new_tokens=body["max_tokens"])[0]
                text, p, c = g.text, g.prompt_tokens, g.completion_tokens
            else:
                text = _grounded_reply(body["messages"])
                p, c = sum(len(m["content"].split()) for m in body["messages"]), len(text.split())
            return {"id": "x", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("loopback server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_http_client_retries_429_and_500_and_counts_tokens():
    with ScriptedServer(fail_first=[429, 500, 503]) as srv:
        gen = OpenAIHTTPGenerator(srv.url + "/v1", model="m", concurrency=1, backoff=0.01,
                                  price_in_per_mtok=1.0, price_out_per_mtok=2.0)
        out = gen.chat([[{"role": "user", "content": "Text: Ada Lenn lives in Varra."}]], max_tokens=20)
        assert out[0].text == "Ada Lenn lives in Varra." and out[0].finish_reason == "stop"
        assert gen.usage.retries == 3 and gen.usage.errors == 0 and srv.requests == 4
        assert gen.usage.by_status == {"429": 1, "500": 1, "503": 1, "200": 1}
        assert gen.usage.completion_tokens == 5 and gen.usage.cost_usd > 0
        # Concurrency: many conversations, answers in input order.
        convs = [[{"role": "user", "content": f"Text: item {i}."}] for i in range(12)]
        gen8 = OpenAIHTTPGenerator(srv.url, model="m", concurrency=8)
        assert [c.text for c in gen8.chat(convs, max_tokens=8)] == [f"item {i}." for i in range(12)]


def test_http_client_gives_up_after_retries_and_reports_refusals():
    with ScriptedServer(fail_first=[500] * 10) as srv:
        gen = OpenAIHTTPGenerator(srv.url, model="m", concurrency=1, max_retries=2, backoff=0.01)
        with pytest.raises(EngrainError, match="answered no request"):
            gen.chat([[{"role": "user", "content": "hi"}]], max_tokens=4)
        assert srv.requests == 3
    with ScriptedServer() as srv:
        gen = OpenAIHTTPGenerator(srv.url, model="forbidden", backoff=0.01)
        with pytest.raises(EngrainError, match="refused"):
            gen.chat([[{"role": "user", "content": "hi"}]], max_tokens=4)
    dead = OpenAIHTTPGenerator("http://127.0.0.1:9", model="m", max_retries=1, backoff=0.01, timeout=2)
    with pytest.raises(EngrainError, match="answered no request"):
        dead.chat([[{"role": "user", "content": "hi"}]], max_tokens=4)


def test_http_server_backed_by_a_real_model(tiny_lm):
    with ScriptedServer(tiny_lm=tiny_lm) as srv:
        gen = OpenAIHTTPGenerator(srv.url, model="tiny", concurrency=2)
        out = gen.chat([[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Hi there"}]],
                       max_tokens=6)
        assert len(out) == 2 and all(c.completion_tokens > 0 for c in out)
        assert gen.usage.completion_tokens == sum(c.completion_tokens for c in out)


def _many_docs(n: int) -> dict:
    docs = {}
    for i in range(n):
        docs[f"station-{i}"] = (f"Station {i}", f"Station Number{i} stands on Hill{i}. It was founded by Person{i} "
                                               f"in {1900 + i}. Station Number{i} has {i + 3} towers. "
                                               f"Person{i} lived in Town{i} for {i + 10} years.")
    return docs


def _synth_cmd(ws: Path, url: str) -> list[str]:
    return [sys.executable, "-m", "engrain.cli", "synth", "-w", str(ws), "--strategies", "rephrase",
            "--generator", url, "--generator-model", "scripted", "--per-chunk", "2", "--json"]


def test_sigkill_mid_run_then_resume_loses_nothing_and_duplicates_nothing(tmp_path):
    ws = write_corpus(tmp_path / "ws", _many_docs(24), sentences_per_chunk=4)
    (ws / "engrain.yaml").write_text("synth:\n  chunks_per_batch: 2\n  concurrency: 2\n")
    items_path = ws / "synth" / "rephrase.jsonl"
    progress_path = ws / "synth" / "progress" / "rephrase.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with ScriptedServer(delay=0.05) as srv:
        proc = subprocess.Popen(_synth_cmd(ws, srv.url), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline:
            if progress_path.exists() and len(progress_path.read_text().splitlines()) >= 4:
                break
            if proc.poll() is not None:
                pytest.fail(f"synth ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = read_jsonl(items_path)
        done_before = len(progress_path.read_text().splitlines())
        assert before and done_before < 24, "the kill must land mid-run"
        with open(items_path, "a") as f:
            f.write('{"id": "torn", "text": "half a li')  # what a kill during a write leaves behind
        res = subprocess.run(_synth_cmd(ws, srv.url), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    rep = summary["strategies"]["rephrase"]
    assert rep["chunks_done_before"] == done_before
    after = read_jsonl(items_path)  # every line parses: the torn tail was cut
    ids = [it["id"] for it in after]
    assert len(ids) == len(set(ids)), "duplicates after resume"
    assert {it["id"] for it in before} <= set(ids), "items written before the kill were lost"
    progress = read_jsonl(progress_path)
    assert len({p["key"] for p in progress}) == 24
    # Every chunk reached its quota exactly once (the scripted writer is always grounded).
    per_chunk: dict[str, int] = {}
    for it in after:
        per_chunk[it["chunk_sha256"][0]] = per_chunk.get(it["chunk_sha256"][0], 0) + 1
    assert len(per_chunk) == 24 and set(per_chunk.values()) == {2}
    assert all(it["generator"].endswith("#scripted") for it in after)
