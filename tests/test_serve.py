"""engrain serve against a real running server on loopback, driven by the official ``openai`` client: the model
list, chat/completions with and without streaming, the ``engrain`` extra field, errors in OpenAI's shape, the API
key, concurrent mixed-memory requests batched per memory, shared weights, the report route, the playground in
headless Chromium, the CLI's refusal to listen openly without a key, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from serve_workspace import DOCS, ThreadServer, free_port, make_workspace

from engrain.errors import EngrainError

KEY = "test-key-0123456789abcdef"
QUESTION = "Who kept the logbook of the Varn lighthouse?"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir, tokenizer):
    return make_workspace(tmp_path_factory.mktemp("serve") / "acme", str(tiny_model_dir), tokenizer)


@pytest.fixture(scope="module")
def server(ws, tiny_model_dir):
    from engrain.serve.app import build, create_app

    engine, scheduler = build(ws.root, str(tiny_model_dir), device="cpu")
    app = create_app(engine, scheduler, api_key=KEY, max_tokens_limit=64)
    with ThreadServer(app) as srv:
        srv.engine, srv.scheduler = engine, scheduler
        yield srv
    assert not scheduler.thread.is_alive()  # the lifespan's shutdown drained and stopped the worker


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


MODELS = ["acme:base", "acme:context", "acme:rag", "acme:lora", "acme:lora+rag"]


def ask(client, model, question=QUESTION, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          max_tokens=kw.pop("max_tokens", 12), **kw)


# ---------------------------------------------------------------------------------------------------------------
# what is served
# ---------------------------------------------------------------------------------------------------------------


def test_models_lists_every_memory_that_opens(client):
    models = {m.id: m for m in client.models.list()}
    assert list(models) == MODELS
    assert models["acme:lora+rag"].model_extra["engrain"]["layout"] == "rag"
    assert models["acme:lora+rag"].model_extra["engrain"]["hybrid"] == "fused"  # rag.hybrid's default
    assert client.models.retrieve("acme:lora").id == "acme:lora"


def test_only_memories_that_can_open_are_listed(tmp_path, tiny_lm, ws):
    from engrain.memory.parametric import META_FILE
    from engrain.serve.engine import Engine
    from engrain.workspace import Workspace

    empty = Engine(Workspace.at(tmp_path / "Empty WS"), tiny_lm)
    assert list(empty.served) == ["empty-ws:base"] and {"context", "rag"} <= set(empty.skipped)
    # corpus only: context, but no rag and no hybrid; an unfinished training folder is not a memory
    partial = Workspace.at(tmp_path / "part")
    (partial.corpus_dir).mkdir(parents=True)
    for name in ("documents.jsonl", "chunks.jsonl"):
        (partial.corpus_dir / name).write_bytes((ws.corpus_dir / name).read_bytes())
    (partial.memory_dir("lora")).mkdir(parents=True)
    (partial.memory_dir("lora") / "adapter_config.json").write_text("{}")
    assert not (partial.memory_dir("lora") / META_FILE).exists()
    assert list(Engine(partial, tiny_lm).served) == ["part:base", "part:context"]


def test_lora_is_merged_by_default_and_shares_the_base_weights_as_adapters(server, ws, tiny_lm):
    """By default a LoRA memory is folded into its own copy of the weights (answers at the base model's speed); with
    lora_adapters it adds only its adapter's tensors to the one base model. Both give the same logits."""
    import torch

    from engrain.serve.engine import Engine

    merged = server.engine
    base = sum(p.numel() * p.element_size() for p in merged.lm.model.parameters())
    assert merged._peft is None and not any("lora_" in n for n, _ in merged.modules["lora"].named_parameters())
    assert 1.8 * base < merged.weight_bytes() < 2.2 * base  # one more copy, for the one LoRA memory
    shared = Engine(ws, tiny_lm, lora_adapters=True)
    lora = sum(p.numel() * p.element_size() for n, p in shared._peft.named_parameters() if "lora_" in n)
    assert lora > 0 and "lora" not in shared.modules
    assert shared.weight_bytes() < 1.5 * base  # a second copy of the weights would double it
    ids = torch.tensor([shared.encode("The Varn lighthouse")])
    with merged.weights("lora") as m, torch.no_grad():
        folded = m(input_ids=ids).logits
    with shared.weights("lora") as m, torch.no_grad():
        adapted = m(input_ids=ids).logits
    with shared.weights("base") as m, torch.no_grad():
        plain = m(input_ids=ids).logits
    assert torch.allclose(folded, adapted, atol=1e-4) and not torch.allclose(folded, plain, atol=1e-4)
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["weights_mb"] > 0 and health["rss_mb"] > 0


# ---------------------------------------------------------------------------------------------------------------
# answering
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_chat_completion_with_each_memory(client, ws, model):
    r = ask(client, model)
    assert r.object == "chat.completion" and r.model == model
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    extra = r.model_extra["engrain"]
    assert extra["memory"] == model.split(":", 1)[1] and extra["latency_ms"] > 0
    if model.endswith("rag"):
        known = {json.loads(line)["id"] for line in ws.chunks_path.read_text().splitlines()}
        assert extra["chunks"] and set(extra["chunks"]) <= known
        assert any(c.startswith("lighthouse#") for c in extra["chunks"])  # retrieval found the right document
    else:
        assert extra["chunks"] == []
    if model.endswith("context"):
        assert r.usage.prompt_tokens > sum(len(t) for t in DOCS.values()) // 8  # the documents are in the prompt


def test_lora_answers_differ_from_base(client):
    """The adapter is applied to the lora memory's requests and not to the base model's."""
    base = ask(client, "acme:base", max_tokens=16).choices[0].message.content
    lora = ask(client, "acme:lora", max_tokens=16).choices[0].message.content
    assert base != lora


def test_a_question_asked_again_reuses_its_prompt_and_gets_the_same_answer(client, server):
    """The prompt cache: the second time, all of the prompt but its last token comes from the cache (counted in
    /health), and the greedy answer is the same."""
    question = "What does the Varn lighthouse keeper write in the logbook every night?"
    first = ask(client, "acme:rag", question)
    before = httpx.get(server.url + "/health").json()["prompt_cache"]
    again = ask(client, "acme:rag", question)
    after = httpx.get(server.url + "/health").json()["prompt_cache"]
    assert again.choices[0].message.content == first.choices[0].message.content
    assert after["hits"] == before["hits"] + 1
    assert after["tokens_reused"] - before["tokens_reused"] == again.usage.prompt_tokens - 1


def test_health_says_where_the_worker_spent_a_rag_answer(client, server):
    """/health's worker_seconds: a rag answer adds time to retrieval, prefill and decode, and the parts never add
    up to more than the batches' time; its prefill_tokens count the request and the prompt tokens it computed."""
    health = httpx.get(server.url + "/health").json()
    before, tokens_before = health["worker_seconds"], health["prefill_tokens"]
    answer = ask(client, "acme:rag", "Which harbour do the ferries leave from?")
    health = httpx.get(server.url + "/health").json()
    after, tokens_after = health["worker_seconds"], health["prefill_tokens"]
    grew = {k: after[k] - before[k] for k in after}
    # one request admitted; what its prefill computed is its prompt, less any KV a cached start gave
    computed = {k: tokens_after[k] - tokens_before[k] for k in tokens_after}
    assert computed["requests"] == 1 and computed["padding"] == 0
    assert 0 < computed["tokens"] <= answer.usage.prompt_tokens
    assert grew["retrieval"] > 0 and grew["prefill"] > 0 and grew["decode"] > 0
    assert after["retrieval"] + after["prefill"] + after["decode"] <= after["busy"] + 1e-3
    assert after["other"] == pytest.approx(after["busy"] - after["retrieval"] - after["prefill"] - after["decode"],
                                           abs=2e-3)


def test_the_server_loads_on_a_thread_that_ends_and_hands_back_errors(ws, tiny_model_dir, monkeypatch):
    """``build`` loads the model and memories on a passing thread, so the main thread keeps no OpenMP pool beside the
    worker's (passing_thread.py); what the loading raises reaches the caller as it is."""
    import engrain.models
    from engrain.serve.app import build
    from engrain.serve.passing_thread import on_passing_thread

    loaded_on = []
    real = engrain.models.load_for_workspace

    def load(*args, **kwargs):
        loaded_on.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(engrain.models, "load_for_workspace", load)
    _, scheduler = build(ws.root, str(tiny_model_dir), device="cpu")
    scheduler.close()
    assert len(loaded_on) == 1 and loaded_on[0] is not threading.current_thread() and not loaded_on[0].is_alive()
    assert on_passing_thread(lambda: 6 * 7) == 42
    with pytest.raises(EngrainError):
        build(ws.root, str(ws.root / "no such model"), device="cpu")


def test_reuse_chunks_serves_later_questions_from_their_chunks_kv(ws, tiny_model_dir):
    """``engrain serve --reuse-chunks``: a new question over chunks an earlier one had in view, in whatever order,
    takes their KV from the chunk cache (counted in /health) and is answered; the same question twice gets the same
    answer."""
    from engrain.serve.app import build, create_app

    engine, scheduler = build(ws.root, str(tiny_model_dir), device="cpu", reuse_chunks=True)
    with ThreadServer(create_app(engine, scheduler, api_key=KEY, max_tokens_limit=64)) as srv:
        chat = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        first = ask(chat, "acme:rag", QUESTION)
        later = ask(chat, "acme:rag", "When do the ferries leave Tessly harbour, near the Varn lighthouse?")
        again = ask(chat, "acme:rag", QUESTION)
        stats = httpx.get(srv.url + "/health").json()["prompt_cache"]["chunk_kv"]
    seen, now = first.model_extra["engrain"]["chunks"], later.model_extra["engrain"]["chunks"]
    # a chunk seen before, in another place: the prompt cache (a shared start) cannot serve it, the chunk cache can
    assert set(seen) & set(now) and seen[:len(now)] != now and later.usage.completion_tokens > 0
    assert stats["chunk_hits"] >= 1 and stats["tokens_reused"] > 0
    assert again.choices[0].message.content == first.choices[0].message.content


@pytest.mark.parametrize("model", ["acme:lora", "acme:rag"])
def test_streaming_matches_the_full_answer(client, model):
    full = ask(client, model, max_tokens=20)
    stream = ask(client, model, max_tokens=20, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert finals[0].model_extra["engrain"]["chunks"] == full.model_extra["engrain"]["chunks"]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": "acme:base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_completions_endpoint(client):
    r = client.completions.create(model="acme:lora", prompt="The Varn lighthouse", max_tokens=6)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 6 and isinstance(r.choices[0].text, str)
    s = list(client.completions.create(model="acme:rag", prompt=QUESTION, max_tokens=6, stream=True))
    assert s[-1].model_extra["engrain"]["chunks"]


def test_stop_strings_and_max_tokens(client):
    r = ask(client, "acme:lora", max_tokens=30)
    text = r.choices[0].message.content
    assert r.usage.completion_tokens <= 30
    if len(text) > 4:  # stop at a piece of the answer: it is cut before it and finishes with "stop"
        stop = text[3:5]
        cut = ask(client, "acme:lora", max_tokens=30, stop=[stop])
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].message.content


def test_concurrent_requests_are_batched_per_memory(server, client):
    """Jobs queued together run in batches of one memory each; each answer equals the one it gets alone."""
    jobs = [(m, q) for m in ("acme:base", "acme:lora", "acme:lora+rag", "acme:context")
            for q in (QUESTION, "When was the harbour dredged?")]
    alone = {(m, q): ask(client, m, q).choices[0].message.content for m, q in jobs}
    results: dict = {}

    def worker(m, q):
        results[(m, q)] = ask(client, m, q)

    sched = server.scheduler
    before = len(sched.batch_log)
    sched.pause()
    try:
        threads = [threading.Thread(target=worker, args=job) for job in jobs * 2]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while sched.pending() < len(threads) and time.time() < deadline:
            time.sleep(0.05)
        assert sched.pending() == len(threads)
    finally:
        sched.resume()
    for t in threads:
        t.join(60)
    # A stream's batch is logged once its last row is done, which can be after that row's answer was sent: wait for
    # the worker to go idle.
    deadline = time.time() + 30
    while sched.pending() and time.time() < deadline:  # queued and running jobs
        time.sleep(0.05)
    batches = list(sched.batch_log)[before:]
    # base and context need different layouts; lora+rag (fused: three readings a step) decodes apart from lora
    assert sorted(w for w, _ in batches) == ["base", "base", "lora", "lora"]
    assert sorted(n for _, n in batches) == [4, 4, 4, 4]
    for (m, q), r in results.items():
        assert r.model_extra["engrain"]["batch_size"] > 1
        assert r.choices[0].message.content == alone[(m, q)], (m, q)


# ---------------------------------------------------------------------------------------------------------------
# errors, limits, auth
# ---------------------------------------------------------------------------------------------------------------


def post(server, path, content, key=KEY, **headers):
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json", **headers},
                      timeout=60)


def assert_error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code
    return err


def test_bad_json_and_bad_fields(server):
    assert_error(post(server, "/v1/chat/completions", b"{not json"), 400, "invalid_json")
    assert_error(post(server, "/v1/chat/completions", b"[1, 2]"), 400, "invalid_json")
    err = assert_error(post(server, "/v1/chat/completions", json.dumps({"model": "acme:base"})), 400)
    assert err["param"] == "messages"
    bad_role = {"model": "acme:base", "messages": [{"role": "robot", "content": "x"}]}
    assert_error(post(server, "/v1/chat/completions", json.dumps(bad_role)), 400)


def test_unknown_model_is_404_and_never_a_path(client, server):
    with pytest.raises(openai.NotFoundError) as exc:
        ask(client, "acme:nope")
    assert exc.value.body["code"] == "model_not_found"
    for name in ("../../etc/passwd", "acme:../../engrain.yaml", "acme:lora/../lora", "/etc/passwd", "lora"):
        with pytest.raises(openai.NotFoundError):
            ask(client, name)
    assert_error(httpx.get(server.url + "/v1/models/..%2F..%2Fetc%2Fpasswd",
                           headers={"Authorization": f"Bearer {KEY}"}), 404)


def test_limits(client, server):
    with pytest.raises(openai.BadRequestError) as exc:
        ask(client, "acme:base", max_tokens=65)  # this server's limit is 64
    assert exc.value.body["param"] == "max_tokens"
    long_question = "lighthouse " * 2100  # over the tiny model's 2048-token window, under the body limit
    for model in ("acme:base", "acme:context", "acme:rag"):
        with pytest.raises(openai.BadRequestError) as exc:
            ask(client, model, long_question)
        assert exc.value.body["code"] == "context_length_exceeded"
    big = json.dumps({"model": "acme:base", "messages": [{"role": "user", "content": "x" * 70_000}]})
    assert_error(post(server, "/v1/chat/completions", big), 413, "request_too_large")
    # a body without a declared length is counted as it arrives
    chunked = httpx.post(server.url + "/v1/chat/completions", content=iter([big.encode()[:40_000], big.encode()[40_000:]]),
                         headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert_error(chunked, 413, "request_too_large")


def test_api_key(server):
    body = json.dumps({"model": "acme:base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert_error(post(server, "/v1/chat/completions", body, key=None), 401, "missing_api_key")
    assert_error(post(server, "/v1/chat/completions", body, key="wrong"), 401, "invalid_api_key")
    assert_error(httpx.get(server.url + "/v1/models"), 401)
    assert_error(httpx.get(server.url + "/reports/latest"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert post(server, "/v1/chat/completions", body).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # liveness needs no key


def test_latest_report_is_served_read_only(server, ws):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert_error(httpx.get(server.url + "/reports/latest", headers=auth), 404)
    for i, name in enumerate(("old-bench", "new-bench")):
        (ws.reports_dir / name).mkdir(parents=True, exist_ok=True)
        (ws.reports_dir / name / "report.html").write_text(f"<html><body>report {name}</body></html>")
        os.utime(ws.reports_dir / name / "report.html", (1_700_000_000 + i, 1_700_000_000 + i))
    r = httpx.get(server.url + "/reports/latest", headers=auth)
    assert r.status_code == 200 and "report new-bench" in r.text
    assert httpx.get(server.url + "/engrain/info", headers=auth).json()["report"]["name"] == "new-bench"
    for path in ("/reports/new-bench/report.html", "/reports/latest/../../engrain.yaml", "/reports/..%2Fcorpus"):
        assert httpx.get(server.url + path, headers=auth).status_code == 404


# ---------------------------------------------------------------------------------------------------------------
# playground, in headless Chromium
# ---------------------------------------------------------------------------------------------------------------


def test_playground_in_chromium(server, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "playground.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server.url + "/")
            page.fill("#key", KEY)  # this server asks for a key; the page shows the field
            page.fill("#question", QUESTION)
            page.click("#go")
            page.wait_for_selector("#status[data-state=done]", timeout=90_000)
            cards = page.query_selector_all(".card")
            assert [c.get_attribute("data-model") for c in cards] == MODELS
            assert all(c.get_attribute("data-state") == "done" for c in cards)
            for c in cards:
                assert " ms · " in c.inner_text()
            rag = page.query_selector('.card[data-model="acme:rag"] .chunks').inner_text()
            assert rag.startswith("chunks: ") and "#" in rag
            assert page.locator("#report").is_visible() or not (server.engine.ws.reports_dir).exists()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size[0] == 1280 and img.size[1] >= 400  # the page fits the window: no card overflows
        assert len(img.convert("L").getcolors(1 << 16) or []) > 20  # text was drawn, not a blank page


# ---------------------------------------------------------------------------------------------------------------
# the CLI: refusal without a key, graceful shutdown
# ---------------------------------------------------------------------------------------------------------------


def engrain_cmd(*args) -> list[str]:
    return [sys.executable, "-c", "from engrain.cli import main; main()", *args]


def test_open_host_without_key_is_refused(tmp_path):
    r = subprocess.run(engrain_cmd("serve", "-w", str(tmp_path), "--host", "0.0.0.0"), capture_output=True,
                       text=True, timeout=120, env={**os.environ, "ENGRAIN_API_KEY": ""})
    assert r.returncode == 2 and "without an API key" in r.stderr and "Traceback" not in r.stderr


def test_sigterm_finishes_the_request_in_flight(ws, tiny_model_dir):
    port = free_port()
    proc = subprocess.Popen(engrain_cmd("serve", "-w", str(ws.root), "--model", str(tiny_model_dir), "--port",
                                        str(port)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.3)
        body = {"model": "acme:lora", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 400,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200  # loopback without a key: no key needed
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {") and '"content"' in line:
                    proc.send_signal(signal.SIGTERM)  # mid-answer
                    break
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][6:])
        assert last["choices"][0]["finish_reason"] == "length"  # the whole answer, not cut by the shutdown
        assert proc.wait(60) == 0  # a clean exit after the drain
        assert "engrain serve: stopped" in proc.stdout.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_vllm_command_serves_the_lora_memories_as_they_are(ws, tiny_model_dir, tmp_path):
    from engrain.errors import EngrainError
    from engrain.export import vllm_command
    from engrain.workspace import Workspace

    argv = vllm_command(ws)["argv"]
    assert argv[:3] == ["vllm", "serve", str(tiny_model_dir)] and "--enable-lora" in argv
    assert argv[argv.index("--lora-modules") + 1] == f"acme:lora={ws.memory_dir('lora')}"
    assert argv[argv.index("--max-lora-rank") + 1] == "8"  # rank 4 rounded up to a value vLLM accepts
    assert argv[argv.index("--served-model-name") + 1] == "acme:base"  # the same names as engrain serve
    with pytest.raises(EngrainError, match="No trained LoRA memory"):
        vllm_command(Workspace.at(tmp_path))


def test_prefix_memory_is_served_on_the_shared_base_weights(tmp_path, ws, tiny_model_dir, tiny_lm):
    """A structure-changing memory gets its own module tree over the base model's tensors, not a second copy."""
    import shutil

    import torch

    from engrain.config import TrainConfig
    from engrain.serve.engine import Engine
    from engrain.train.loop import train
    from engrain.workspace import Workspace

    other = Workspace.at(tmp_path / "pfx")
    shutil.copytree(ws.corpus_dir, other.corpus_dir)
    shutil.copytree(ws.synth_dir, other.synth_dir)
    train(other, TrainConfig(memory="prefix", max_steps=1, seq_len=128, micro_batch=2, replay_share=0.0,
                             eval_every=50, save_every=0, options={"prefix": {"length": 8}}), str(tiny_model_dir),
          show_progress=False)
    engine = Engine(other, tiny_lm)
    assert "pfx:prefix" in engine.served and "pfx:prefix+rag" not in engine.served  # no index, no hybrid
    module = engine.modules["prefix"]
    base_ptrs = {p.data_ptr() for p in tiny_lm.model.parameters()}
    assert {p.data_ptr() for p in module.model.parameters()} == base_ptrs
    base_bytes = sum(p.numel() * p.element_size() for p in tiny_lm.model.parameters())
    assert engine.weight_bytes() < 1.2 * base_bytes
    ids = torch.tensor([[1, 2, 3, 4]])
    with engine.weights("prefix") as m, torch.no_grad():
        with_prefix = m(input_ids=ids).logits
    with engine.weights("base") as m, torch.no_grad():
        plain = m(input_ids=ids).logits
    assert not torch.allclose(with_prefix, plain, atol=1e-4)  # the prefix is read; the base model is untouched


def test_compile_decode_compiles_every_served_model_before_the_first_request(ws, tiny_model_dir, monkeypatch):
    """With model.compile_decode the server runs a short decode through each module that decodes compiled (the base
    model and the merged LoRA copy) at start; without it, nothing is run and nothing is said."""
    from engrain.models import compiled_decode, load_model
    from engrain.serve import app as serve_app
    from engrain.serve.engine import Engine

    ran = []
    monkeypatch.setattr(compiled_decode, "run", lambda forward, model, *a: ran.append(model) or forward(model, *a))
    logs = []
    plain = load_model(str(tiny_model_dir), device="cpu", dtype="float32", decode_weights="int8")
    serve_app._warm_up(Engine(ws, plain), logs.append)
    assert not ran and not any("compil" in line for line in logs)
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32", decode_weights="int8", compile_decode=True)
    engine = Engine(ws, lm)
    serve_app._warm_up(engine, logs.append)
    assert {id(m) for m in ran} == {id(lm.model), id(engine.modules["lora"])}
    assert "compiled for base, lora" in logs[-1]


def test_draft_query_drafts_with_each_memorys_own_weights(ws, tiny_model_dir, monkeypatch):
    """rag.draft_query in the server: rag's question is drafted by the base model, a hybrid's by its trained
    memory's module (a merged LoRA is a module of its own), then retrieved with the draft and answered."""
    from engrain.models import load_model
    from engrain.serve.engine import Engine
    from engrain.serve.scheduler import Job, Scheduler

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    engine = Engine(ws, lm)
    engine.rag.config = engine.rag.config.model_copy(update={"draft_query": True})
    drafted = []
    real = engine.rag.drafts

    def drafts(texts, max_new_tokens, form, lm=None):
        drafted.append((texts, lm.model))
        return real(texts, max_new_tokens, form, lm=lm)

    monkeypatch.setattr(engine.rag, "drafts", drafts)
    scheduler = Scheduler(engine)
    try:
        for name in ("rag", "lora+rag"):
            events = []
            job = Job(served=engine.get(f"{engine.prefix}:{name}"), question=QUESTION, max_tokens=4,
                      emit=events.append)
            scheduler.submit(job)
            deadline = time.time() + 60
            while not any(e["type"] in ("done", "error") for e in events) and time.time() < deadline:
                time.sleep(0.05)
            assert any(e["type"] == "done" for e in events), events
            assert job.chunks
    finally:
        scheduler.close(30)
    assert [texts for texts, _ in drafted] == [[QUESTION], [QUESTION]]
    with engine.weights("base") as base, engine.weights("lora") as lora:
        assert drafted[0][1] is base and drafted[1][1] is lora and lora is not base


def test_decode_weights_and_retrieval_are_built_before_the_first_request(ws, tiny_model_dir, monkeypatch):
    """The server builds each served module's quantized decode weights and opens retrieval at start, so the first
    requests do not queue behind them: answering afterwards builds nothing."""
    from engrain.models import decode_weights, load_model
    from engrain.serve import app as serve_app
    from engrain.serve.engine import Engine
    from engrain.serve.scheduler import Job, Scheduler

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32", decode_weights="int8")
    engine = Engine(ws, lm)
    logs = []
    serve_app._warm_up(engine, logs.append)
    assert "base decode weights, lora decode weights, retrieval" in logs[0]
    built = []
    real = decode_weights.build
    monkeypatch.setattr(decode_weights, "build", lambda *a, **k: built.append(a) or real(*a, **k))
    scheduler = Scheduler(engine)
    try:
        for name in ("base", "lora"):
            events = []
            served = engine.get(f"{engine.prefix}:{name}")
            job = Job(served=served, prompt_ids=engine.chat_ids([{"role": "user", "content": QUESTION}]),
                      max_tokens=4, temperature=0.0, top_p=1.0, emit=events.append)
            scheduler.submit(job)
            deadline = time.time() + 60
            while not any(e["type"] in ("done", "error") for e in events) and time.time() < deadline:
                time.sleep(0.05)
            assert any(e["type"] == "done" for e in events), events
    finally:
        scheduler.close(30)
    assert built == []


def test_a_fused_hybrid_answers_in_the_server_as_engrain_compare_does(ws, tiny_model_dir):
    """rag.hybrid fused in the server: the hybrid's requests decode as one FusedStream (the base model reading the
    chunks, the memory and the base model closed-book) and give the tokens the batch path gives; under
    --lora-adapters, where the base model and the memory are one model, the hybrid reads the chunks and says so."""
    from engrain.memory.registry import open_memory
    from engrain.models import load_model
    from engrain.serve.engine import Engine
    from engrain.serve.scheduler import Job, Scheduler

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    engine = Engine(ws, lm)
    fused = engine.rag.config.model_copy(update={"hybrid": "fused", "fused_weight": 1.0})
    engine.rag.config = fused
    assert engine.fuses("lora") and not engine.fuses("base")
    questions = [QUESTION, "When was the Varn lighthouse first lit?"]
    scheduler = Scheduler(engine)
    try:
        jobs, events = [], []
        for q in questions:
            events.append([])
            jobs.append(Job(served=engine.get(f"{engine.prefix}:lora+rag"), question=q, max_tokens=8,
                            emit=events[-1].append))
            scheduler.submit(jobs[-1])
        deadline = time.time() + 60
        while not all(any(e["type"] in ("done", "error") for e in ev) for ev in events) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.close(30)
    served = ["".join(e.get("text", "") for e in ev if e["type"] == "delta") for ev in events]
    assert all(j.closed_ids and j.chunks for j in jobs)
    hybrid = open_memory("lora+rag", ws, lm)
    hybrid.config = fused
    batch = hybrid.answer(questions, max_new_tokens=8)
    assert [a.chunks for a in batch] == [j.chunks for j in jobs]
    assert [s.strip() for s in served] == [a.text for a in batch]
    read = open_memory("lora+rag", ws, lm)
    read.config = fused.model_copy(update={"hybrid": "read"})
    assert [a.text for a in read.answer(questions, max_new_tokens=8)] != [a.text for a in batch]

    logs = []
    with_adapters = Engine(ws, load_model(str(tiny_model_dir), device="cpu", dtype="float32"), lora_adapters=True,
                           log=logs.append)
    assert with_adapters.served[f"{engine.prefix}:lora+rag"].info["hybrid"] == "read"
    assert any("lora+rag read the chunks" in line and "--lora-adapters" in line for line in logs), logs
    with_adapters.rag.config = fused
    assert not with_adapters.fuses("lora")
