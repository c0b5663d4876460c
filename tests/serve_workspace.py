"""A small real workspace for the server's tests and benchmark: a few invented documents ingested, indexed, and a
LoRA memory trained for a couple of steps on synthetic items written here; plus a running server fixture helper."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

DOCS = {
    "lighthouse": "The Varn lighthouse stands on a granite spit north of Tessly. It was first lit in 1874. "
                  "Its keeper Oda Brisk kept a logbook of every storm for forty years.",
    "harbour": "Tessly harbour was dredged in 1931. The pier is 212 metres long and ferries to Orrin leave at dawn.",
    "mill": "The Corran mill ground oats until 1958. The river Sele turns its oak wheel. "
            "Today the mill is a museum with a tea room run by the Haddow family.",
}


def write_synth(synth_dir: Path, n: int = 8) -> None:
    rows = []
    for i in range(n):
        rows.append({"id": f"qa-{i}", "strategy": "qa", "chunk_ids": [f"c{i}"], "doc_ids": ["lighthouse"], "seed": 0,
                     "messages": [{"role": "user", "content": f"Who kept the Varn logbook in year {1874 + i}?"},
                                  {"role": "assistant", "content": "Oda Brisk kept the logbook."}]})
        rows.append({"id": f"tx-{i}", "strategy": "rephrase", "chunk_ids": [f"c{i}"], "doc_ids": ["lighthouse"],
                     "text": "The keeper of the Varn lighthouse was Oda Brisk."})
    synth_dir.mkdir(parents=True, exist_ok=True)
    (synth_dir / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_workspace(root: Path, model_spec: str, tokenizer=None, *, lora_steps: int = 2, lr: float = 0.05):
    """``root`` (its name becomes the model-name prefix) with corpus, index and a trained ``lora`` memory."""
    from engrain.config import IngestConfig, TrainConfig, load_config, save_config
    from engrain.corpus.ingest import ingest
    from engrain.rag.index import build_index
    from engrain.train.loop import train
    from engrain.workspace import Workspace

    docs = root.parent / f"{root.name}-docs"
    docs.mkdir(parents=True, exist_ok=True)
    for doc_id, text in DOCS.items():
        (docs / f"{doc_id}.txt").write_text(text, encoding="utf-8")
    ws = Workspace.at(root)
    ingest(docs, ws, IngestConfig(chunk_tokens=32, chunk_overlap=4), tokenizer=tokenizer)
    build_index(ws)
    write_synth(ws.synth_dir)
    train(ws, TrainConfig(memory="lora", max_steps=lora_steps, lora_rank=4, lr=lr, seq_len=128, micro_batch=2,
                          eval_every=50, save_every=0, replay_share=0.0, epochs=1.0), model_spec, show_progress=False)
    config = load_config(ws.config_path)
    config.model.dtype = "float32"  # the reference path: answers compared exactly, alone and batched
    save_config(config, ws.config_path)
    return ws


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn serving an app in a background thread on a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
