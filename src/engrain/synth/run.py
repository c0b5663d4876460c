"""``engrain synth``: run the strategies over the corpus, check every item, write as it goes.

For each strategy, chunks not yet done (by content hash) are taken ``chunks_per_batch`` at a time. A batch
runs in rounds: each round asks the strategy for jobs covering what is still missing of each chunk's quota,
sends all of them to the generator at once (second-stage jobs, like answering a written question, in a
follow-up call), and checks each candidate: the strategy's own check, the grounding filter, the leak guard,
then near-duplicates. Survivors and one progress line per chunk are appended and fsynced before the next
batch, so a kill loses at most the batch in flight and a restart neither repeats nor drops an item.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..config import SynthConfig
from ..corpus.schema import read_chunks, read_documents
from ..errors import EngrainError
from ..progress import Progress
from ..workspace import Workspace
from . import entities, facts, implications, qa, rephrase
from .base import Candidate, Job, Unit, document_subject
from .dedup import NearDuplicateIndex
from .grounding import SourceIndex, check
from .leak import LeakGuard, load_question_texts
from .store import StrategyStore, item_id

STRATEGIES = {m.NAME: m for m in (facts, rephrase, qa, entities, implications)}
# Rough share of model-made candidates that survive the filters with the embedded model, for --dry-run.
EXPECTED_ACCEPTANCE = {"rephrase": 0.3, "qa": 0.3, "entities": 0.25, "implications": 0.3}
# A strategy's own quality checks, which grounding "off" switches off with the rest; structural failures stay.
SOFT_CHECKS = {"misses-entities", "answer-misses-fact", "question-gives-answer"}
LOCAL_TOKENS_PER_S = 250.0  # embedded model, 2 CPU cores, bench/bench_synth.py
HTTP_TOKENS_PER_S = 400.0  # a modest server with 8 requests in flight


@dataclass
class StrategyReport:
    strategy: str
    chunks: int = 0
    chunks_done_before: int = 0
    chunks_run: int = 0
    chunks_leak_blocked: int = 0
    chunks_overlapping_questions: int = 0
    generated: int = 0
    accepted: int = 0
    already_present: int = 0
    rejected: Counter = field(default_factory=Counter)
    under_covered: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["rejected"] = dict(self.rejected.most_common())
        d["under_covered_count"] = len(self.under_covered)
        d["under_covered"] = self.under_covered[:50]
        d["seconds"] = round(self.seconds, 2)
        d["acceptance"] = round(self.accepted / self.generated, 3) if self.generated else None
        d["accepted_per_min"] = round(60 * self.accepted / self.seconds, 1) if self.seconds > 0 else None
        return d


def load_units(ws: Workspace) -> list[Unit]:
    """Every chunk of the corpus as a unit, once per distinct content (identical chunks are made once)."""
    chunks = read_chunks(ws)
    docs = {d.id: d for d in read_documents(ws)} if ws.documents_path.exists() else {}
    units, seen, subjects = [], set(), {}
    for ch in chunks:
        if not ch.sha256:
            ch.sha256 = hashlib.sha256(ch.text.encode("utf-8")).hexdigest()
        if ch.sha256 in seen or not ch.text.strip():
            continue
        seen.add(ch.sha256)
        doc = docs.get(ch.doc_id)
        if ch.doc_id not in subjects:
            subjects[ch.doc_id] = document_subject(doc, ch)
        units.append(Unit(ch, doc, subjects[ch.doc_id]))
    if not units:
        raise EngrainError(f"{ws.chunks_path} holds no chunks with text.",
                           hint="Run `engrain ingest DOCS_DIR -w WORKSPACE` on a folder with documents.")
    return units


def _quota(name: str, cfg: SynthConfig) -> int:
    return cfg.facts_per_chunk if name == "facts" else cfg.per_chunk


def _items_per_job(module) -> int:
    return getattr(module, "PER_JOB", 1)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Synthesizer:
    """One run over the corpus: holds the generator, the leak guard and the per-strategy reports."""

    def __init__(self, ws: Workspace, cfg: SynthConfig, *, generator=None, generator_factory=None,
                 exclude_questions: list[Path] | None = None, show_progress: bool = True) -> None:
        for name in cfg.strategies:
            if name not in STRATEGIES:
                raise EngrainError(f"Unknown synthesis strategy '{name}'.",
                                   hint=f"Choose from: {', '.join(STRATEGIES)}.")
        self.ws, self.cfg = ws, cfg
        self._generator, self._factory = generator, generator_factory
        texts = load_question_texts(list(exclude_questions or []))
        self.guard = LeakGuard(texts, n=cfg.leak_ngram, mode=cfg.leak_mode)
        self.show_progress = show_progress
        self.spec = cfg.generator
        self.units = load_units(ws)
        self.calls = 0
        self._about: dict[str, list[Candidate]] = {}  # the facts strategy's entity-centred items, by chunk key

    @property
    def generator(self):
        if self._generator is None:
            if self._factory is None:
                raise EngrainError("No generator configured for a model-made strategy.",
                                   hint="Pass --generator URL|MODEL or choose --strategies facts.")
            self._generator = self._factory()
        return self._generator

    # ---------------------------------------------------------------------------------------------
    def plan(self) -> dict:
        """What a run would do: chunks to synthesise, jobs, tokens and time (estimates, nothing spent)."""
        from ..clients import is_url

        http = is_url(self.cfg.generator)
        count = (lambda t: max(1, len(t) // 4)) if http else self._token_counter()
        plan, total_out, total_in = {}, 0, 0
        state = entities.prepare(self.units) if "entities" in self.cfg.strategies else None
        for name in self.cfg.strategies:
            module, store = STRATEGIES[name], StrategyStore(self.ws.synth_dir, name)
            todo = [u for u in self.units if u.key not in store.done]
            quota = _quota(name, self.cfg)
            if not module.USES_MODEL:
                self._about = facts.about_items(self.units, self.cfg.facts_about) if self.cfg.facts_about else {}
                n_items = sum(len(self._fact_candidates(u, [])) for u in todo)
                plan[name] = {"chunks_todo": len(todo), "chunks_done": len(self.units) - len(todo),
                              "items_max": n_items, "prompt_tokens": 0, "completion_tokens": 0}
                continue
            jobs_per_chunk = math.ceil(quota / _items_per_job(module))
            acc = EXPECTED_ACCEPTANCE.get(name, 0.3) if not http else 0.8
            attempts = min(self.cfg.max_rounds, 1 / acc)
            sample = todo[:: max(1, len(todo) // 40)] if todo else []
            prompt_per_job = (sum(count(_prompt_text(j)) for u in sample
                                  for j in module.jobs(u, list(range(jobs_per_chunk)), 0, state))
                              / max(1, len(sample) * jobs_per_chunk)) if sample else 0
            n_jobs = len(todo) * jobs_per_chunk * attempts
            stages = 2 if name == "qa" else 1
            max_tok = qa.QUESTION_TOKENS + qa.ANSWER_TOKENS if name == "qa" else module.MAX_TOKENS
            in_tok = n_jobs * (prompt_per_job + (count(todo[0].chunk.text) if name == "qa" and todo else 0))
            out_tok = n_jobs * max_tok * 0.7
            total_in, total_out = total_in + in_tok, total_out + out_tok
            plan[name] = {"chunks_todo": len(todo), "chunks_done": len(self.units) - len(todo),
                          "items_target": len(todo) * quota, "requests": int(n_jobs * stages),
                          "prompt_tokens": int(in_tok), "completion_tokens": int(out_tok)}
        rate = HTTP_TOKENS_PER_S if http else LOCAL_TOKENS_PER_S
        seconds = total_out / rate + total_in / (rate * 10)
        return {"chunks": len(self.units), "strategies": plan, "prompt_tokens": int(total_in),
                "completion_tokens": int(total_out), "estimated_seconds": round(seconds),
                "estimate_basis": f"{rate:.0f} generated tokens/s ({'HTTP' if http else 'local CPU'}); "
                                  "acceptance from earlier runs of the embedded model"}

    def _token_counter(self):
        try:
            from ..models import load_tokenizer

            tok = load_tokenizer(self.spec)
            return lambda t: len(tok(t, add_special_tokens=False)["input_ids"])
        except EngrainError:
            return lambda t: max(1, len(t) // 4)

    # ---------------------------------------------------------------------------------------------
    def run(self) -> dict:
        reports: dict[str, StrategyReport] = {}
        if self.guard.active:
            for name in self.cfg.strategies:
                self.guard.check_instructions(_template_text(STRATEGIES[name]), name)
        self.ws.synth_dir.mkdir(parents=True, exist_ok=True)
        t_start = time.time()
        for name in self.cfg.strategies:
            reports[name] = self._run_strategy(name)
        gen = self._generator
        return {
            "workspace": str(self.ws.root), "chunks": len(self.units),
            "generator": getattr(gen, "name", None), "usage": gen.usage.to_dict() if gen is not None else None,
            "seconds": round(time.time() - t_start, 2), "leak_guard": {
                "questions": self.guard.count, "mode": self.guard.mode, "ngram": self.guard.n},
            "strategies": {k: r.to_dict() for k, r in reports.items()},
        }

    def _run_strategy(self, name: str) -> StrategyReport:
        module, cfg = STRATEGIES[name], self.cfg
        store = StrategyStore(self.ws.synth_dir, name)
        report = StrategyReport(name, chunks=len(self.units))
        todo = [u for u in self.units if u.key not in store.done]
        report.chunks_done_before = len(self.units) - len(todo)
        if self.guard.active:
            overlapping = {u.key for u in self.units if self.guard.source_overlaps(u.chunk.text)}
            report.chunks_overlapping_questions = len(overlapping)
            if self.guard.mode == "strict":
                report.chunks_leak_blocked = sum(u.key in overlapping for u in todo)
                todo = [u for u in todo if u.key not in overlapping]
        # Chunks other items may show or draw on (open-book neighbours, entity partners): in strict mode none that
        # shares text with the questions.
        strict = self.guard.active and self.guard.mode == "strict"
        self._neighbours = [u for u in self.units if u.key not in overlapping] if strict else self.units
        state = None
        if name == "entities":
            state = entities.prepare(self._neighbours)
        self._about = facts.about_items(self._neighbours, cfg.facts_about) if name == "facts" and cfg.facts_about \
            else {}
        dedup = NearDuplicateIndex(threshold=cfg.dedup_threshold)
        for row in store.existing:
            dedup.add(_content(row))
        t0 = time.time()
        with Progress(self.show_progress, len(todo), 0, f"synth {name}") as bar:
            for start in range(0, len(todo), cfg.chunks_per_batch):
                batch = todo[start:start + cfg.chunks_per_batch]
                if module.USES_MODEL:
                    items, progress = self._model_batch(name, module, batch, store, dedup, report, state)
                else:
                    items, progress = self._facts_batch(batch, store, dedup, report)
                store.write_batch(items, progress)
                report.seconds = time.time() - t0
                rate = report.accepted / max(report.seconds, 1e-6)
                bar.advance(len(batch), f"chunks · {report.accepted} items · {rate:.1f}/s")
        report.seconds = time.time() - t0
        report.chunks_run = len(todo)
        return report

    # ---------------------------------------------------------------------------------------------
    def _item(self, name: str, cand: Candidate, generator_name: str) -> dict:
        units = [cand.unit, *cand.partners]
        shas = [u.key for u in units]
        item = {"id": item_id(name, "+".join(shas), cand.variant), "strategy": name,
                "chunk_ids": [u.chunk.id for u in units], "doc_ids": list(dict.fromkeys(u.chunk.doc_id for u in units)),
                "chunk_sha256": shas, "generator": generator_name, "seed": self.cfg.seed, "created": _now(),
                "variant": cand.variant}
        if cand.messages is not None:
            item["messages"] = cand.messages
        else:
            item["text"] = cand.text
        if cand.context:
            item["context"] = [{"chunk_id": u.chunk.id, "text": u.chunk.text} for u in cand.context]
        return item

    def _accept(self, name: str, cand: Candidate, store: StrategyStore, dedup: NearDuplicateIndex,
                report: StrategyReport, model_made: bool, sources: dict[str, SourceIndex]) -> tuple[dict | None, str]:
        """The item when ``cand`` passes every check, else the rejection reason."""
        gen_name = getattr(self._generator, "name", "none") if model_made else "deterministic"
        item = self._item(name, cand, gen_name)
        if item["id"] in store.ids:
            return item, "present"  # written before a restart: counts toward the quota, not written again
        if cand.reject and not (self.cfg.grounding == "off" and cand.reject in SOFT_CHECKS):
            return None, cand.reject
        if model_made:
            src = sources.get(cand.source) or sources.setdefault(cand.source, SourceIndex(cand.source))
            verdict = check(cand.check, src, strictness=self.cfg.grounding, finish_reason=cand.finish_reason,
                            prompt=cand.prompt or None)
            if not verdict.ok:
                return None, verdict.reason
        if self.guard.active and self.guard.leaked(cand.content, cand.source):
            return None, "leak"
        # Deterministic items differ by design in one blanked span, so only exact repeats (chunk overlaps) go.
        content = _content(item)
        if not (dedup.add(content) if model_made else dedup.add_exact(content)):
            return None, "duplicate"
        return item, "ok"

    def _progress_row(self, unit: Unit, quota: int, accepted: int, generated: int, rejected: Counter,
                      rounds: int) -> dict:
        return {"key": unit.key, "chunk_id": unit.chunk.id, "doc_id": unit.chunk.doc_id, "quota": quota,
                "accepted": accepted, "generated": generated, "rejected": dict(rejected), "rounds": rounds,
                "created": _now()}

    def _fact_candidates(self, unit: Unit, neighbours: list[Unit]) -> list[Candidate]:
        """The facts strategy's items for one chunk, open-book ones included, a chunk of ``neighbours`` beside it."""
        cfg = self.cfg
        asking = facts.Asking(cfg.facts_questions, cfg.facts_short_answers, cfg.facts_fronted,
                              cfg.facts_spelled_numbers, cfg.facts_bare_questions, cfg.facts_reworded)
        cands = facts.candidates(unit, cfg.facts_per_chunk, cfg.facts_wordings, cfg.facts_orders, asking)
        if cfg.facts_reading:
            cands += facts.open_book(cands, facts.similar_chunk(unit, neighbours) if neighbours else None,
                                     cfg.facts_reading)
        return cands + facts.polar_items(unit, cfg.facts_polar) + self._about.get(unit.key, [])

    def _facts_batch(self, batch: list[Unit], store, dedup, report) -> tuple[list[dict], list[dict]]:
        items, progress = [], []
        for unit in batch:
            accepted, rejected = 0, Counter()
            cands = self._fact_candidates(unit, self._neighbours)
            for cand in cands:
                item, why = self._accept("facts", cand, store, dedup, report, False, {})
                if item is not None:
                    accepted += 1
                    if why == "present":
                        report.already_present += 1
                    else:
                        items.append(item)
                else:
                    rejected[why] += 1
            report.generated += len(cands)
            report.accepted += accepted
            report.rejected.update(rejected)
            if accepted == 0:
                report.under_covered.append(unit.chunk.id)
            progress.append(self._progress_row(unit, len(cands), accepted, len(cands), rejected, 1))
        return items, progress

    def _model_batch(self, name: str, module, batch: list[Unit], store, dedup, report,
                     state) -> tuple[list[dict], list[dict]]:
        cfg = self.cfg
        quota = _quota(name, cfg)
        accepted = {u.key: 0 for u in batch}
        generated = {u.key: 0 for u in batch}
        rejected = {u.key: Counter() for u in batch}
        rounds = 0
        items: list[dict] = []
        sources: dict[str, SourceIndex] = {}
        per_job = _items_per_job(module)
        for round_ in range(cfg.max_rounds):
            jobs: list[Job] = []
            for unit in batch:
                missing = quota - accepted[unit.key]
                if missing <= 0:
                    continue
                # Later rounds ask for more than is missing: what failed once fails often.
                n = math.ceil(missing / per_job) * (1 if round_ == 0 else 2)
                jobs += module.jobs(unit, list(range(n)), round_, state)
            if not jobs:
                break
            rounds = round_ + 1
            for cand in self._generate(jobs, module):
                key = cand.unit.key
                generated[key] += 1
                if accepted[key] >= quota:
                    rejected[key]["surplus"] += 1
                    continue
                item, why = self._accept(name, cand, store, dedup, report, True, sources)
                if item is None:
                    rejected[key][why] += 1
                    continue
                accepted[key] += 1
                if why == "present":
                    report.already_present += 1
                else:
                    items.append(item)
        progress = []
        for unit in batch:
            k = unit.key
            report.generated += generated[k]
            report.accepted += accepted[k]
            report.rejected.update({r: c for r, c in rejected[k].items() if r != "surplus"})
            if accepted[k] < quota:
                report.under_covered.append(unit.chunk.id)
            progress.append(self._progress_row(unit, quota, accepted[k], generated[k], rejected[k], rounds))
        return items, progress

    def _generate(self, jobs: list[Job], module) -> list[Candidate]:
        """Run jobs through the generator, stage after stage, until only candidates remain."""
        out: list[Candidate] = []
        pending = jobs
        while pending:
            if self.guard.active:
                # A prompt carrying question text its source cannot explain (e.g. a model-written question
                # that happens to match a benchmark one) is never sent.
                clean = []
                for job in pending:
                    if self.guard.leaked(_prompt_text(job), job.source):
                        out.append(Candidate(job.unit, job.variant, job.source, text="", reject="leak-prompt"))
                    else:
                        clean.append(job)
                pending = clean
            groups: dict[tuple, list[Job]] = {}
            for job in pending:
                temp = self.cfg.temperature if job.temperature is None else job.temperature
                groups.setdefault((job.max_tokens, temp), []).append(job)
            nxt: list[Job] = []
            for (max_tokens, temp), group in groups.items():
                self.calls += 1
                gen = self.generator
                comps = gen.chat([j.messages for j in group], max_tokens=max_tokens, temperature=temp,
                                 top_p=self.cfg.top_p, seed=self.cfg.seed * 100_003 + self.calls)
                for job, comp in zip(group, comps):
                    if comp.finish_reason == "error":
                        out.append(Candidate(job.unit, job.variant, job.source, text="", reject="generator-error"))
                        continue
                    for res in module.on_output(job, comp.text, comp.finish_reason):
                        (nxt if isinstance(res, Job) else out).append(res)
            pending = nxt
        return out


def _template_text(module) -> str:
    """Every fixed string a strategy puts in prompts (instructions, few-shot examples)."""
    parts: list[str] = []
    for key, value in vars(module).items():
        if not key.isupper():
            continue
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, dict):
            parts += [f"{k} {v}" for k, v in value.items() if isinstance(v, str)]
        elif isinstance(value, (list, tuple)):
            parts += [" ".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value]
    return "\n".join(parts)


def _prompt_text(job: Job) -> str:
    return "\n".join(m["content"] for m in job.messages)


def _content(row: dict) -> str:
    """What dedup compares, for a new item and for one read back on resume alike: its text or messages, after the
    ids of the chunks it shows (an open-book item repeats a closed-book one's words with chunks in view)."""
    messages = row.get("messages") or []
    body = str(row["text"]) if "text" in row else "\n".join(str(m.get("content", "")) for m in messages)
    shown = " ".join(c["chunk_id"] for c in row.get("context") or [])
    return f"{shown}\n{body}" if shown else body


def run_synth(ws: Workspace, cfg: SynthConfig, *, model_spec: str | None = None, generator=None,
              exclude_questions: list[Path] | None = None, dry_run: bool = False,
              show_progress: bool = True) -> dict:
    """Plan (``dry_run``) or run synthesis; returns the summary dict the CLI prints."""
    from ..clients import open_generator

    spec = cfg.generator or model_spec

    def factory():
        return open_generator(spec, model_name=cfg.generator_model, batch_size=cfg.batch_size,
                              concurrency=cfg.concurrency, timeout=cfg.timeout_s, max_retries=cfg.max_retries,
                              price_in_per_mtok=cfg.price_in_per_mtok, price_out_per_mtok=cfg.price_out_per_mtok)

    synth = Synthesizer(ws, cfg, generator=generator, generator_factory=factory,
                        exclude_questions=exclude_questions, show_progress=show_progress)
    synth.spec = spec
    if dry_run:
        return {"dry_run": True, **synth.plan()}
    return synth.run()
