"""``context``: every document in the prompt, the question after them.

Order: documents with status "ok", sorted by id, each written as ``[doc-id]`` on a line and then its text,
separated by blank lines. The prompt is the single chat template (``models.chat_messages``/``chat_prompt``).

Two forms of prompt (``form``): ``"chat"`` (``answer``: the above) and ``"continuation"`` (``complete``: the
documents' plain texts, without ``[doc-id]`` lines, separated by blank lines, then a blank line and the sentence
start, no chat template; the continuation is cut at its first newline). Either memory serves both calls: the other
form is a second ContextMemory made on first use, with its own prefix and cache.

Truncation policy, when the corpus does not fit the window (``max_context`` minus ``question_budget`` and
``answer_budget`` tokens, minus the template around the documents):
  1. keep whole documents in id order while they fit;
  2. cut the first one that does not fit at its last sentence end that fits (kept only if at least
     ``MIN_CUT_TOKENS`` of it remain), and drop every document after it.
Every answer then records ``{"truncated": true, "documents_dropped": [...], "documents_cut": [...],
"context_tokens": N}`` in ``Answer.meta`` (``truncated: false`` and the token count otherwise).

KV-prefix reuse: the prompt up to the end of the documents is the same for every question, so its KV cache
is computed once (in slices of ``PREFILL_SLICE`` tokens, which bounds activation memory) and every batch of
questions starts from it: the cache is shared as a broadcast view, not copied per row, and each batch only runs
its question tokens and the answer. Questions of different lengths in one batch are padded *between* the
prefix and the question; the attention mask hides the pads and position ids skip them, so a question sees the
same positions as alone. ``reuse_prefix=False`` runs the identical token ids without the cache (what the
benchmark compares against, and what the test checks gives the same greedy answers).
"""

from __future__ import annotations

import re
import time

from ..models import fastgen
from ..corpus.schema import read_documents
from ..errors import EngrainError
from ..models import (DEFAULT_SYSTEM, LM, chat_messages, chat_prompt, check_starts, continuation_prompt, first_line,
                      line_break_ids, stop_index, stop_token_ids)
from ..workspace import Workspace
from .base import Answer, BuildInfo

MIN_CUT_TOKENS = 32
PREFILL_SLICE = 1024
_QUESTION_MARK = "\x00QUESTION\x00"
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)|\n")
FORMS = ("chat", "continuation")


def render_document(doc_id: str, text: str) -> str:
    return f"[{doc_id}]\n{text.strip()}"


class ContextMemory:
    """All documents in the prompt, with the shared prefix's KV cache computed once and reused."""

    name = "context"

    def __init__(self, workspace: Workspace, lm: LM, *, answer_budget: int = 128, question_budget: int = 256,
                 batch_size: int = 32, reuse_prefix: bool = True, max_context: int | None = None,
                 cache_budget_mb: float = 2048, system: str | None = DEFAULT_SYSTEM, form: str = "chat") -> None:
        if form not in FORMS:
            raise EngrainError(f"Unknown prompt form '{form}' for the context memory.",
                               hint=f"Use one of: {', '.join(FORMS)}.")
        self.form = form
        self.workspace = workspace
        self.lm = lm
        self.answer_budget = answer_budget
        self.question_budget = question_budget
        self.batch_size = batch_size
        self.reuse_prefix = reuse_prefix
        self.max_context = max_context or lm.max_context
        self.cache_budget_mb = cache_budget_mb
        self.system = system
        docs = sorted(read_documents(workspace), key=lambda d: d.id)
        if not docs:
            raise EngrainError(f"{workspace.documents_path} holds no documents, so there is no context to give.",
                               hint="Ingest documents first: engrain ingest DOCS_DIR -w WORKSPACE")
        self.context, self.truncation = self._fit(docs)
        self.prefix_text, self.suffix_template = self._split_template()
        self.prefix_ids = self._encode(self.prefix_text)
        self.truncation["context_tokens"] = len(self.prefix_ids)
        self._cache = None
        self._prefix_seconds = 0.0
        self._other_form: ContextMemory | None = None

    # ---------------------------------------------------------------------------------------------
    # The prompt: documents, truncation, prefix/suffix split
    # ---------------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, context: str, question: str) -> str:
        """The whole prompt of this memory's form for ``question`` (a sentence start in the continuation form)."""
        if self.form == "continuation":
            return continuation_prompt(question, context)
        return chat_prompt(self.lm.tokenizer, chat_messages(question, context, self.system))

    def _render_document(self, doc_id: str, text: str) -> str:
        return text.strip() if self.form == "continuation" else render_document(doc_id, text)

    def _template_overhead(self) -> int:
        return len(self._encode(self._render("x", _QUESTION_MARK)))

    def _fit(self, docs) -> tuple[str, dict]:
        """The documents that fit the window, by the module's truncation policy, and what was cut."""
        budget = self.max_context - self.answer_budget - self.question_budget - self._template_overhead()
        if budget < MIN_CUT_TOKENS:
            raise EngrainError(f"The model's window ({self.max_context} tokens) leaves no room for documents after "
                               f"the question ({self.question_budget}) and answer ({self.answer_budget}) budgets.",
                               hint="Use a model with a longer window or lower the budgets.")
        rendered = [self._render_document(d.id, d.text) for d in docs]
        full = "\n\n".join(rendered)
        enc = self.lm.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) <= budget:
            return full, {"truncated": False, "documents": len(docs)}
        char_limit = enc["offset_mapping"][budget - 1][1]  # everything before this char fits
        kept, cut, start = [], [], 0
        for doc, text in zip(docs, rendered):
            end = start + len(text)
            if end <= char_limit:
                kept.append(text)
            else:
                room = text[:char_limit - start]
                ends = [m.end() for m in _SENTENCE_END.finditer(room)]
                piece = room[:ends[-1]].rstrip() if ends else ""
                if len(self._encode(piece)) >= MIN_CUT_TOKENS:
                    kept.append(piece)
                    cut.append(doc.id)
                break
            start = end + 2  # the blank line between documents
        kept_ids = {d.id for d in docs[:len(kept)]}
        dropped = [d.id for d in docs if d.id not in kept_ids]
        return "\n\n".join(kept), {"truncated": True, "documents": len(kept), "documents_cut": cut,
                                   "documents_dropped": dropped}

    def _split_template(self) -> tuple[str, str]:
        """The rendered prompt split where the documents end: (shared prefix, suffix with a question slot).
        In the continuation form the suffix is the blank line and the start: split after the blank line, the
        prefix would end in one blank-line token where the whole text encodes two newline tokens before a word."""
        full = self._render(self.context, _QUESTION_MARK)
        at = full.find(self.context)
        if at < 0 or full.find(_QUESTION_MARK, at + len(self.context)) < 0:
            raise EngrainError("The chat template does not put the documents before the question, so the "
                               "documents' prefix cannot be shared.", hint="Use reuse_prefix=False with this model.")
        cut = at + len(self.context)
        return full[:cut], full[cut:]

    def question_ids(self, question: str) -> list[int]:
        return self._encode(self.suffix_template.replace(_QUESTION_MARK, question))

    # ---------------------------------------------------------------------------------------------
    # The shared prefix's KV cache
    # ---------------------------------------------------------------------------------------------

    def prefix_cache(self):
        """The prefix's DynamicCache, computed on first use and kept."""
        import torch
        from transformers import DynamicCache

        if self._cache is None:
            t0 = time.perf_counter()
            model = self.lm.model
            cache = DynamicCache(config=model.config)
            with torch.inference_mode():
                for start in range(0, len(self.prefix_ids), PREFILL_SLICE):
                    ids = torch.tensor([self.prefix_ids[start:start + PREFILL_SLICE]], device=self.lm.device)
                    model(input_ids=ids, cache=cache, use_cache=True)
            self._cache = cache
            self._prefix_seconds = time.perf_counter() - t0
        return self._cache

    def cache_rows(self) -> int:
        """How many questions share one batch: the batch size, limited by the cache memory budget."""
        n_layers = self.lm.model.config.num_hidden_layers
        cfg = self.lm.model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype_bytes = next(self.lm.model.parameters()).element_size()
        per_row_mb = 2 * n_layers * heads * head_dim * (len(self.prefix_ids) + self.question_budget
                                                       + self.answer_budget) * dtype_bytes / 2**20
        return max(1, min(self.batch_size, int(self.cache_budget_mb // max(per_row_mb, 1e-6))))

    def batch_cache(self, rows: int):
        """The prefix's cache expanded to ``rows`` questions (a view: the prefix is not copied per row)."""
        from transformers import DynamicCache

        layers = [(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
                  for layer in self.prefix_cache().layers]
        return DynamicCache(layers, config=self.lm.model.config)

    # ---------------------------------------------------------------------------------------------
    # Memory protocol
    # ---------------------------------------------------------------------------------------------

    def build(self, workspace: Workspace) -> BuildInfo:
        if self.reuse_prefix:
            self.prefix_cache()
        return BuildInfo(seconds=self._prefix_seconds, details={"context_tokens": len(self.prefix_ids)})

    def answer(self, questions: list[str], max_new_tokens: int = 48) -> list[Answer]:
        return self._in_form("chat")._respond(questions, max_new_tokens)

    def complete(self, starts: list[str], max_new_tokens: int = 32) -> list[Answer]:
        """Each start continued as raw text after the documents' plain texts (see ``Memory.complete``), with the
        same truncation policy, document order and KV-prefix reuse as ``answer``."""
        check_starts(starts)
        return self._in_form("continuation")._respond(starts, max_new_tokens)

    def _in_form(self, form: str) -> "ContextMemory":
        """This memory when it has ``form``, else its sibling of that form (same settings), made on first use."""
        if form == self.form:
            return self
        if self._other_form is None:
            self._other_form = ContextMemory(
                self.workspace, self.lm, answer_budget=self.answer_budget, question_budget=self.question_budget,
                batch_size=self.batch_size, reuse_prefix=self.reuse_prefix, max_context=self.max_context,
                cache_budget_mb=self.cache_budget_mb, system=self.system, form=form)
        return self._other_form

    def _respond(self, questions: list[str], max_new_tokens: int) -> list[Answer]:
        """Answers (chat form) or continuations (continuation form) after the shared prefix."""
        t0 = time.perf_counter()
        suffixes = [self.question_ids(q) for q in questions]
        what = "sentence start" if self.form == "continuation" else "question"
        for q, s in zip(questions, suffixes):
            total = len(self.prefix_ids) + len(s) + max_new_tokens
            if total > self.max_context:
                raise EngrainError(f"The {what} '{q[:60]}...' is {len(s)} tokens; with the documents "
                                   f"({len(self.prefix_ids)} tokens) and {max_new_tokens} answer tokens that is "
                                   f"{total}, over the model's window of {self.max_context}.",
                                   hint=f"Shorten the {what} to under {self.question_budget} tokens, or lower "
                                        "the answer length.")
        tok = self.lm.tokenizer
        stop_ids = stop_token_ids(tok) + (line_break_ids(tok) if self.form == "continuation" else [])
        fast = self.reuse_prefix and fastgen.supports(self.lm.model)
        if fast:
            news = self._generate_shared(suffixes, max_new_tokens, stop_ids)
        else:
            rows = self.batch_size if not self.reuse_prefix else self.cache_rows()
            order = sorted(range(len(questions)), key=lambda i: len(suffixes[i]))
            news = [[] for _ in questions]
            for start in range(0, len(order), rows):
                idx = order[start:start + rows]
                for i, seq in zip(idx, self._generate_plain(idx, suffixes, max_new_tokens, stop_ids)):
                    news[i] = seq.tolist()
        lengths = [stop_index(seq, stop_ids) for seq in news]
        texts = [tok.decode(seq[:n], skip_special_tokens=True).strip() for seq, n in zip(news, lengths)]
        if self.form == "continuation":
            texts = [first_line(t) for t in texts]
        # The prefix is paid once, inside the call that first needs it, and spread over that call's questions.
        per_q = (time.perf_counter() - t0) * 1000 / max(1, len(questions))
        meta = {**self.truncation, "prefix_reused": self.reuse_prefix}
        P = len(self.prefix_ids)
        return [Answer(text, per_q, P + len(s), n, meta=dict(meta)) for text, n, s in zip(texts, lengths, suffixes)]

    def _generate_shared(self, suffixes: list[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[list[int]]:
        """Every question's answer over the shared prefix cache, read once per step for the whole batch, with
        finished rows replaced by waiting questions (continuous batching)."""
        prefix = [(layer.keys, layer.values) for layer in self.prefix_cache().layers]
        return fastgen.generate_many(self.lm.model, suffixes, batch_size=self.batch_size,
                                     max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                     pad_id=self.lm.tokenizer.pad_token_id, prefix=prefix)

    def _generate_plain(self, idx: list[int], suffixes: list[list[int]], max_new_tokens: int, stop_ids: list[int]):
        """``generate()`` on [prefix ; pads ; question]: from the prefix cache (expanded per row) when reusing,
        else recomputing the prefix. The path for architectures the fast loop does not cover."""
        import torch

        pad = self.lm.tokenizer.pad_token_id
        questions, mask = fastgen.left_pad([suffixes[i] for i in idx], pad)
        lead = torch.tensor([self.prefix_ids] * len(idx), dtype=torch.long)
        ids = torch.cat([lead, questions], dim=1).to(self.lm.device)
        mask = torch.cat([torch.ones_like(lead), mask], dim=1).to(self.lm.device)
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad,
                      do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.reuse_prefix:
            kwargs["cache"] = self.batch_cache(len(idx))
        with torch.inference_mode():
            gen = self.lm.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        return gen[:, ids.shape[1]:]

    def describe(self) -> dict:
        return {"memory": "context", "model": self.lm.name, "reuse_prefix": self.reuse_prefix,
                "max_context": self.max_context, "prefix_seconds": round(self._prefix_seconds, 2), **self.truncation}
