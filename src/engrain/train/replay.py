"""Replay against forgetting: general data mixed into every run.

The base model's own greedy answers to general prompts (self-distillation) and, when enabled, its own
continuations of general prose openings (self-prose), each generated once and cached; with ``train.replay_kl``
the replay tokens are trained toward the base model's top-k distribution (``distill.self_targets``).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from ..atomic import write_jsonl
from ..config import TrainConfig
from ..errors import EngrainError
from ..home import engrain_home
from ..jsonl import read_jsonl
from ..models import LM
from ..progress import note
from ..workspace import Workspace
from .data import Example, encode_item, file_safe


def _data_file(name: str) -> Path | None:
    from importlib import resources

    path = Path(str(resources.files("engrain").joinpath("data", name)))
    return path if path.is_file() else None


def _data_lines(name: str) -> list[str]:
    """The non-blank, non-comment lines of a file the package ships (absent: none)."""
    path = _data_file(name)
    if path is None:
        return []
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]


def replay_prompts() -> list[str]:
    """General prompts for self-distillation (shipped with the package; distinct from any evaluation set)."""
    return _data_lines("replay_prompts.txt")


# Rows decoded together while answering the replay prompts, more than `answer`'s default (which `engrain compare`
# keeps, so that its answers compare across runs): python bench/bench_answer_batch.py times the sizes side by side.
REPLAY_BATCH = 64
DEFAULT_SOURCES = ("self_distill",)  # where neither the config nor the memory kind names the replay's sources
PROSE_TEMPERATURE, PROSE_TOP_P = 0.8, 0.95  # self-prose continuations are sampled (see self_prose_items)


def self_distill_items(ws: Workspace, lm: LM, max_new_tokens: int, n_prompts: int | None = None) -> list[dict]:
    """The base model's greedy answers to the first ``n_prompts`` general prompts (all when None), generated once
    per model: cached in the workspace and, for a model engrain keeps in ENGRAIN_HOME (the embedded model, hub
    models), there too, so a new workspace on the same model reuses them; a larger pool generates only the prompts
    not yet answered (training on its own outputs keeps the model close to itself on general requests)."""
    return _own_answers(ws, lm, replay_prompts(), max_new_tokens, n_prompts, "self-distill", "sd",
                        "self-distillation replay data")


def _own_answers(ws: Workspace, lm: LM, prompts: list[str], max_new_tokens: int, n: int | None, name: str,
                 tag: str, what: str) -> list[dict]:
    """The base model's greedy chat answers to the first ``n`` of ``prompts``, as replay items (cached, see
    ``_base_outputs``)."""
    from ..models import answer, answering_lm

    def make(todo: list[str], progress) -> list[str]:
        # In the dtype the model answers in (bf16 where native), not the fp32 it is trained in: these are its answers.
        return [g.text for g in answer(answering_lm(lm), todo, max_new_tokens=max_new_tokens,
                                       batch_size=REPLAY_BATCH, progress=progress)]

    def row(i: int, prompt: str, text: str) -> dict:  # an empty answer is the model's behaviour too
        return {"id": f"replay-{tag}-{i}", "strategy": name, "generator": lm.name,
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]}

    return _base_outputs(ws, lm, f"{name}-{file_safe(lm.name)}-{max_new_tokens}.jsonl", prompts, n, make, row,
                         lambda r: r["messages"][0]["content"], what, "replay answers")


def replay_questions() -> list[str]:
    """Short general-knowledge questions for self-QA replay (shipped with the package; kept apart from the general
    questions forgetting is measured on, by fact and by kind: see the file's header)."""
    return _data_lines("replay_questions.txt")


def self_qa_items(ws: Workspace, lm: LM, max_new_tokens: int, n: int | None = None) -> list[dict]:
    """The base model's greedy answers to the first ``n`` short general questions (``replay_questions``): replay in
    the shape of the documents' question items, which teach short factual answers that otherwise reach general
    questions too."""
    return _own_answers(ws, lm, replay_questions(), max_new_tokens, n, "self-qa", "qa", "self-QA replay data")


# Self-questions: the base model writes the user's turn itself (sampled from the chat template's empty user turn,
# as Magpie does), so the replay asks what the model's own instruction data taught it to expect, short factual
# questions among them, instead of only the requests engrain ships.
QUESTION_TEMPERATURE, QUESTION_TOP_P, QUESTION_MAX_TOKENS = 1.0, 0.95, 48
QUESTION_ROUND, QUESTION_ROUNDS = 256, 16  # samples per seeded round; rounds at most, however few are kept
QUESTION_WORDS = (3, 30)
_STOP_WORDS = frozenset("a an the of in on at to for and or is are was were be do does did what which who whom "
                        "whose how many much when where why there it its this that with by from as".split())


def _content_words(text: str) -> frozenset[str]:
    from ..synth.text import normalize

    return frozenset(w for w in normalize(text).split() if w not in _STOP_WORDS)


def asks_a_measured_question(question: str, measured: list[frozenset[str]]) -> bool:
    """Whether ``question`` holds every content word of a general question forgetting is measured on (it asks the
    same thing, in whatever words around them): such a question never becomes replay."""
    words = _content_words(question)
    return any(m and m <= words for m in measured)


def keep_question(text: str, finish_reason: str) -> bool:
    """A sampled user turn worth replaying: it ended on its own, is one line, asks a question and is short."""
    text = text.strip()
    n = len(text.split())
    return (finish_reason == "stop" and "\n" not in text and text.endswith("?")
            and QUESTION_WORDS[0] <= n <= QUESTION_WORDS[1])


def self_questions(ws: Workspace, lm: LM, n: int) -> list[str]:
    """At least ``n`` distinct questions the base model asks itself (fewer when ``QUESTION_ROUNDS`` rounds do not
    make them), in the order sampled; round r samples with seed r, so a pool grown by rounds is the one a fresh
    machine makes. Those asking a measured general question are dropped. Cached like the replay answers."""
    from ..evaluate.forgetting import general_questions
    from ..models import answering_lm, chat_prompt, generate
    from ..models.prompts import DEFAULT_SYSTEM
    from ..synth.text import normalize

    probe = chat_prompt(lm.tokenizer, [{"role": "system", "content": DEFAULT_SYSTEM},
                                       {"role": "user", "content": "\x00"}], add_generation_prompt=False)
    if "\x00" not in probe:
        return []
    opening = probe.split("\x00", 1)[0]
    measured = [_content_words(q.question) for q in general_questions()]
    caches = _cache_paths(ws, lm, f"self-questions-{file_safe(lm.name)}.jsonl")
    rounds: dict[int, list[str]] = {}
    for cache in caches:
        if cache.is_file():
            for _, r in read_jsonl(cache, hint=f"Delete {cache}; the next run makes it again."):
                rounds.setdefault(int(r["round"]), list(r["questions"]))
    pool: dict[str, str] = {}  # normalised -> as sampled, in the order sampled

    def add(questions: list[str]) -> None:
        for q in questions:
            if not asks_a_measured_question(q, measured):
                pool.setdefault(normalize(q), q)

    for r in sorted(rounds):
        add(rounds[r])
    grew = False
    while len(pool) < n and len(rounds) < QUESTION_ROUNDS:
        r = len(rounds)
        if not grew:
            note(f"engrain: the base model writing its own general questions for replay (rounds of {QUESTION_ROUND} "
                 f"samples, once; cached in {caches[-1]})")
        gens = generate(answering_lm(lm), [opening] * QUESTION_ROUND, max_new_tokens=QUESTION_MAX_TOKENS,
                        temperature=QUESTION_TEMPERATURE, top_p=QUESTION_TOP_P, seed=r, batch_size=REPLAY_BATCH)
        rounds[r] = [g.text.strip() for g in gens if keep_question(g.text, g.finish_reason)]
        add(rounds[r])
        grew = True
    if grew or not all(c.is_file() for c in caches):
        for cache in caches:
            write_jsonl(cache, [{"round": r, "questions": rounds[r]} for r in sorted(rounds)])
    return list(pool.values())


def self_question_items(ws: Workspace, lm: LM, max_new_tokens: int, n: int) -> list[dict]:
    """The base model's greedy answers to ``n`` questions it asked itself (``self_questions``)."""
    return _own_answers(ws, lm, self_questions(ws, lm, n), max_new_tokens, n, "self-questions", "sq",
                        "self-question replay data")


def replay_openings() -> list[str]:
    """Openings of general prose the base model continues for self-prose replay (shipped with the package; its
    topics are kept apart from the general text and questions forgetting is measured on)."""
    return _data_lines("replay_openings.txt")


def self_prose_items(ws: Workspace, lm: LM, max_new_tokens: int, n_openings: int | None = None) -> list[dict]:
    """The base model's sampled continuations of the first ``n_openings`` prose openings, as plain text items (no
    chat template): the document items teach the weights to continue text as the user's documents read, and these
    hold them to the base model's own prose elsewhere. Generated once per model, every opening together, and cached
    as the self-distillation answers are."""
    from ..models import answering_lm, generate

    def make(starts: list[str], progress) -> list[str]:
        # Sampled, not greedy: greedy continuations of the 135M model repeat themselves (a one-off look, not kept),
        # and a loop is text unlike what the model reads elsewhere.
        return [g.text for g in generate(answering_lm(lm), starts, max_new_tokens=max_new_tokens,
                                         temperature=PROSE_TEMPERATURE, top_p=PROSE_TOP_P, seed=0,
                                         batch_size=REPLAY_BATCH, progress=progress)]

    def row(i: int, start: str, text: str) -> dict:
        return {"id": f"replay-sp-{i}", "strategy": "self-prose", "generator": lm.name, "opening": start,
                "text": start + (text if text[:1] in ",.;:!?'\")" else f" {text}")}

    # All openings at once, whatever the draw: sampled text depends on what it was sampled beside, so a pool grown
    # in steps would not be the one a fresh machine makes (there are few openings, and they continue in seconds).
    rows = _base_outputs(ws, lm, f"self-prose-{file_safe(lm.name)}-{max_new_tokens}.jsonl", replay_openings(),
                         None, make, row, lambda r: r["opening"], "self-prose replay data", "replay prose")
    return rows[:n_openings]


def _base_outputs(ws: Workspace, lm: LM, name: str, every: list[str], n: int | None, make, row, key,
                  what: str, label: str) -> list[dict]:
    """Rows made by ``make`` (the base model's outputs for a list of inputs, given a progress callback) and ``row``
    for the first ``n`` of ``every`` (``key`` gives a row's input back), read from the
    workspace's cache and ENGRAIN_HOME's where the model is one engrain keeps (``model_key``); only the inputs no
    cache holds are generated, and both caches are rewritten with every row known, in ``every``'s order."""
    from ..progress import Progress

    wanted = every[:n]
    if not wanted:
        return []
    caches = _cache_paths(ws, lm, name)
    have: dict[str, dict] = {}
    for cache in caches:
        if cache.is_file():
            for _, r in read_jsonl(cache, hint=f"Delete {cache}; the next run makes it again."):
                have.setdefault(key(r), r)
    missing = [x for x in wanted if x not in have]
    if missing:
        note(f"engrain: generating {what} ({len(missing)} inputs, once; cached in {caches[-1]})")
        with Progress(True, len(missing), 0, label) as bar:
            texts = make(missing, bar.advance)
        position = {x: i for i, x in enumerate(every)}
        for x, text in zip(missing, texts):
            have[x] = row(position[x], x, text)
    rows = [have[x] for x in every if x in have]
    for cache in caches:
        if missing or not cache.is_file():
            write_jsonl(cache, rows)
    return [have[x] for x in wanted]


def _cache_paths(ws: Workspace, lm: LM, name: str) -> list[Path]:
    """Where a replay file called ``name`` is cached: the workspace, and ENGRAIN_HOME where the model is one engrain
    keeps (``model_key``), last."""
    caches = [ws.root / "train" / "replay" / name]
    if (mk := model_key(lm)) is not None:
        caches.append(engrain_home() / "replay" / mk / name)
    return caches


def model_key(lm: LM) -> str | None:
    """What identifies the weights the replay answers came from: the model folder's weight files (names, sizes,
    modification times). None for a model outside ENGRAIN_HOME (a user's own folder, which may be retrained in
    place): its answers stay in the workspace."""
    folder = Path(lm.path).resolve()
    if not folder.is_dir() or not folder.is_relative_to(engrain_home().resolve()):
        return None
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not files:
        return None
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha1(json.dumps([str(folder), stats]).encode()).hexdigest()[:16]


def source_counts(want: int, sources: list[str], weights: list[float] | None) -> list[int]:
    """``want`` replay items split between ``sources`` in proportion to ``weights`` (equal where None), rounded so
    that they add up to ``want``: the largest remainders get the items left over, the earlier source on a tie."""
    if weights is None:
        weights = [1.0] * len(sources)
    if len(weights) != len(sources) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise EngrainError(f"train.replay_shares {list(weights)} does not fit train.replay_sources {sources}.",
                           hint="Give one share (zero or more, not all zero) per replay source, in the same order.")
    exact = [want * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(sources)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:want - sum(counts)]:
        counts[i] += 1
    return counts


def replay_examples(ws: Workspace, lm: LM, cfg: TrainConfig, n_train: int) -> list[Example]:
    """``replay_share`` of the final mix, drawn (seeded, cycling) from the enabled replay sources."""
    if cfg.replay_share <= 0 or n_train == 0:
        return []
    want = round(n_train * cfg.replay_share / (1.0 - cfg.replay_share))
    sources = list(dict.fromkeys(cfg.replay_sources or DEFAULT_SOURCES))  # unset: the trainer gives the kind's
    # Each source gets its share of the replay (equal unless train.replay_shares says otherwise), so adding one does
    # not depend on how large its pool is.
    shares = source_counts(want, sources, cfg.replay_shares)
    picked: list[dict] = []
    for source, share in zip(sources, shares):
        if share == 0:
            continue
        if source == "self_distill":
            # No more prompts answered than the mix draws: the base model's answers cost generation time of their own
            # (bench/bench_answer_batch.py), and a pool larger than the draw adds no prompt to it.
            n_prompts = share if cfg.replay_prompts is None else min(cfg.replay_prompts, share)
            pool = self_distill_items(ws, lm, cfg.replay_max_new_tokens, n_prompts)
        elif source == "self_prose":
            pool = self_prose_items(ws, lm, cfg.replay_max_new_tokens, share)
        elif source == "self_qa":
            pool = self_qa_items(ws, lm, cfg.replay_max_new_tokens, share)
        elif source == "self_questions":
            pool = self_question_items(ws, lm, cfg.replay_max_new_tokens, share)
        elif source == "general_text":
            raise EngrainError("train.replay_sources names general_text, the text engrain measures forgetting on "
                               "(its perplexity): training on it would hide what the memory forgets.",
                               hint="Use self_prose: the base model's own continuations of general prose openings.")
        else:
            raise EngrainError(f"Unknown replay source '{source}' in train.replay_sources.",
                               hint="Use self_distill, self_prose, self_qa and/or self_questions.")
        if pool:
            rng = random.Random(cfg.seed)  # one source alone draws exactly as the single pool did before
            order = list(range(len(pool)))
            rng.shuffle(order)
            picked += [pool[order[i % len(pool)]] for i in range(share)]
    if not picked:
        note("engrain: no replay data available (no shipped prompts or openings); training without replay")
        return []
    return [encode_item(lm.tokenizer, item, f"{item['id']}#{i}", kind="replay") for i, item in enumerate(picked)]
