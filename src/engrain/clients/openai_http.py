"""Any OpenAI-compatible chat server (vLLM, Ollama, llama.cpp server, OpenAI) as a generator.

Requests run ``concurrency`` at a time in threads (httpx.Client is thread-safe). Rate limits (429),
server errors (5xx), timeouts and dropped connections are retried with exponential backoff plus jitter,
honouring ``Retry-After``; other 4xx answers are the caller's mistake and stop the run with the server's
message. Token counts come from the server's ``usage``; cost is tokens times the given prices.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from ..errors import EngrainError
from .completion import Completion, Usage

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def chat_url(base: str) -> str:
    """``http://host:8000``, ``.../v1`` or the full ``.../v1/chat/completions`` all work."""
    base = base.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/chat/completions"
    return base + "/v1/chat/completions"


class OpenAIHTTPGenerator:
    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 120.0, max_retries: int = 5, backoff: float = 0.5, max_backoff: float = 30.0,
                 price_in_per_mtok: float = 0.0, price_out_per_mtok: float = 0.0) -> None:
        self.url = chat_url(url)
        self.model = model or "default"
        self.name = f"{self.url.rsplit('/v1', 1)[0]}#{self.model}"
        self.concurrency = max(1, concurrency)
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.price_in, self.price_out = price_in_per_mtok, price_out_per_mtok
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)), headers=headers,
                                   limits=httpx.Limits(max_connections=self.concurrency * 2))
        self.usage = Usage()
        self._lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)  # the server's tokenizer is unknown here; ~4 characters a token

    def close(self) -> None:
        self.client.close()

    def _count(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                if k == "status":
                    self.usage.by_status[str(v)] = self.usage.by_status.get(str(v), 0) + 1
                else:
                    setattr(self.usage, k, getattr(self.usage, k) + v)

    def _one(self, messages: list[dict], body: dict) -> Completion:
        payload = {**body, "messages": messages}
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                resp = self.client.post(self.url, json=payload)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                self._count(status=type(exc).__name__)
            else:
                self._count(status=resp.status_code)
                if resp.status_code == 200:
                    return self._parse(resp)
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code not in RETRYABLE_STATUS:
                    raise EngrainError(f"The generator at {self.url} refused the request ({last}).",
                                       hint="Check --generator-model, the API key (ENGRAIN_API_KEY or "
                                            "OPENAI_API_KEY) and that the server speaks the OpenAI chat API.")
                retry_after = resp.headers.get("retry-after")
                if retry_after:
                    try:
                        wait = min(float(retry_after), self.max_backoff)
                    except ValueError:
                        wait = None
            if attempt == self.max_retries:
                break
            self._count(retries=1)
            if wait is None:
                wait = min(self.max_backoff, self.backoff * (2 ** attempt)) * (0.5 + random.random() / 2)
            time.sleep(wait)
        self._count(errors=1)
        return Completion("", finish_reason="error", error=last)

    def _parse(self, resp: httpx.Response) -> Completion:
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            self._count(errors=1)
            return Completion("", finish_reason="error", error=f"malformed response: {exc}")
        usage = data.get("usage") or {}
        p, c = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self._count(requests=1, prompt_tokens=p, completion_tokens=c,
                    cost_usd=(p * self.price_in + c * self.price_out) / 1e6)
        finish = choice.get("finish_reason") or "stop"
        return Completion(text.strip(), p, c, "length" if finish == "length" else "stop")

    def chat(self, conversations: list[list[dict]], *, max_tokens: int, temperature: float = 0.8,
             top_p: float = 0.95, seed: int | None = None, stop: list[str] | None = None) -> list[Completion]:
        if not conversations:
            return []
        body: dict = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        if seed is not None:
            body["seed"] = seed
        if stop:
            body["stop"] = stop[:4]  # OpenAI accepts at most 4 stop sequences
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations))) as pool:
            out = list(pool.map(lambda m: self._one(m, body), conversations))
        self._count(seconds=time.time() - t0)
        if all(c.finish_reason == "error" for c in out) and self.usage.requests == 0:
            raise EngrainError(f"The generator at {self.url} answered no request: {out[0].error}",
                               hint="Start the server (e.g. `vllm serve MODEL`, `ollama serve`) or fix --generator.")
        return out
