"""A resolved model loaded for use: the device, the dtype the machine computes fastest, and the tokenizer.
"""

from __future__ import annotations

import functools
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from ..errors import EngrainError
from ..progress import note
from .fetch import ACCEPTED_SPECS, EMBEDDED_NAME, resolve_model
from .prompts import CHATML_TEMPLATE


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_supported(device: str) -> bool:
    """Whether this device computes in bfloat16 natively (CUDA: Ampere+; CPU: AVX512-BF16 or AMX)."""
    import torch

    from .packed_weights import native_bf16_cpu

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return native_bf16_cpu()


# Training takes bf16 on a CPU only where its products run at least this many times fp32's speed: near a tie, fp32's
# exact sums are worth more than a few percent.
BF16_TRAINING_MARGIN = 1.25


@functools.cache
def bf16_speedup_cpu() -> float:
    """How many times faster than fp32 this CPU multiplies bf16 matrices of a small model's layer size (fp32's time
    over bf16's, best of several products each, timed once per process); 0.0 where oneDNN does not compute bf16
    natively. Native is not always faster: a virtual CPU can report AVX512-BF16 and run bf16 products slower than
    fp32 ones (``python bench/bench_train.py`` times training both ways on the host it runs on)."""
    import torch
    import torch.nn.functional as F

    from .packed_weights import native_bf16_cpu

    if not native_bf16_cpu():
        return 0.0
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 1024, generator=generator), torch.randn(1024, 1024, generator=generator)
    pairs = {torch.float32: (x, w), torch.bfloat16: (x.bfloat16(), w.bfloat16())}
    best = {dtype: float("inf") for dtype in pairs}
    for round_ in range(11):  # alternating, so that a busy moment slows both; the first round warms both up
        for dtype, (a, b) in pairs.items():
            t0 = time.perf_counter()
            F.linear(a, b)
            if round_:
                best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]


# A bf16 model's prompts multiply in fp32 on a CPU whose bf16 products measure at least this many times slower than
# fp32's: the fp32 copy of the layers costs twice the memory, so a near tie keeps bf16.
FP32_PREFILL_MARGIN = 1.25
PREFILL_DTYPES = ("auto", "bfloat16", "float32", "int8")


def prefill_dtype_for(device: str, prefill_dtype: str = "auto") -> str:
    """``model.prefill_dtype`` resolved for ``device`` (``packed_weights`` packs a bf16 model's layers in it):
    as asked; ``auto``: float32 on a CPU whose bf16 products measure ``FP32_PREFILL_MARGIN`` times slower than
    fp32's or more (``bf16_speedup_cpu``), bfloat16 elsewhere. Never int8, which is asked for by name: what it gains
    (``python bench/bench_prefill_dtype.py``, docs/performance.md) did not pay for rounding every token's input by
    default (``int8_speedup_cpu`` says what its products gain on a host)."""
    if prefill_dtype not in PREFILL_DTYPES:
        raise EngrainError(f"Unknown model.prefill_dtype '{prefill_dtype}'.",
                           hint="Use one of: " + ", ".join(PREFILL_DTYPES) + ".")
    if prefill_dtype == "int8" and device == "cpu":
        from .packed_weights import int8_available

        if not int8_available():
            raise EngrainError("model.prefill_dtype is int8, but this PyTorch build does not multiply int8 "
                               "matrices on this CPU.", hint="Use model.prefill_dtype: auto.")
    if prefill_dtype != "auto":
        return prefill_dtype
    return "float32" if device == "cpu" and bf16_slow_cpu() else "bfloat16"


def bf16_slow_cpu() -> bool:
    """Whether this CPU computes bf16 natively but its products measure ``FP32_PREFILL_MARGIN`` times slower than
    fp32's or more (``bf16_speedup_cpu``): there a bf16 model's prompts multiply in fp32."""
    return 0.0 < bf16_speedup_cpu() * FP32_PREFILL_MARGIN <= 1.0


@functools.cache
def int8_speedup_cpu() -> float:
    """How many times faster than the float packing ``auto`` takes (fp32 where ``bf16_slow_cpu``, bf16 elsewhere)
    this CPU runs a prompt's W8A8 product (``packed_weights.Int8Product``, its quantizing included), best
    of several each, timed once per process; 0.0 where nothing is packed or int8 products are missing. A CPU with
    VNNI or AMX can multiply int8 several times faster than floats, and another gains nothing once each token's
    quantizing is paid (``python bench/bench_prefill_dtype.py`` times whole prompts in each form)."""
    import torch

    from . import packed_weights

    if not (packed_weights.available() and packed_weights.int8_available()):
        return 0.0
    # 512 tokens through the embedded model's gate|up product; a generator of its own leaves the global one (a
    # caller's seeded draws) as it was.
    generator = torch.Generator().manual_seed(0)
    layer = SimpleNamespace(weight=(torch.randn(3072, 576, generator=generator) * 0.02).to(torch.bfloat16))
    x = torch.randn(512, 576, generator=generator).to(torch.bfloat16)
    products = {"float": packed_weights.pack(layer, dtype=torch.float32 if bf16_slow_cpu() else torch.bfloat16),
                "int8": packed_weights.pack_int8(layer)}
    best = dict.fromkeys(products, float("inf"))
    with torch.inference_mode():
        for round_ in range(11):  # alternating, so that a busy moment slows both; the first round warms both up
            for name, product in products.items():
                t0 = time.perf_counter()
                product(x)
                if round_:
                    best[name] = min(best[name], time.perf_counter() - t0)
    return best["float"] / best["int8"]


def bf16_trains_faster(device: str) -> bool:
    """Whether training on ``device`` runs faster under bf16 autocast than in fp32: on CUDA where bf16 is native, on
    a CPU where bf16 is native and its products measure ``BF16_TRAINING_MARGIN`` times fp32's speed or more."""
    if device.startswith("cuda"):
        return bf16_supported(device)
    return bf16_speedup_cpu() >= BF16_TRAINING_MARGIN


def cpu_model() -> dict:
    """The CPU's model name and the features that change bf16 numerics and speed. Two hosts train different weights
    from the same seed (AMX tiles and AVX512-BF16 take different kernels), so results and benchmarks name theirs."""
    import platform

    import torch

    from .fastgen import amx_tiles

    name = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux: the platform module's guess
        pass
    try:
        avx512_bf16 = bool(torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the query
        avx512_bf16 = None
    return {"model": name or platform.processor() or platform.machine(), "amx_tiles": amx_tiles(),
            "avx512_bf16": avx512_bf16, "bf16_speedup": round(bf16_speedup_cpu(), 2),
            "int8_speedup": round(int8_speedup_cpu(), 2)}


def pick_dtype(device: str, dtype: str = "auto"):
    """``auto``: bfloat16 where the device computes it natively (CUDA Ampere+, CPUs with AVX512-BF16 or AMX),
    float16 on older GPUs, float32 elsewhere (emulated bf16 is slower than fp32). Answering reads every weight once
    per token, so half the bytes answers faster (``bench/bench_answer_speed.py``); experiments/answering checks the
    answers against fp32. Training loads fp32 weights itself and runs bf16 under autocast."""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype != "auto":
        if dtype not in table:
            raise EngrainError(f"Unknown dtype '{dtype}'.", hint="Use one of: auto, float32, bfloat16, float16.")
        return table[dtype]
    if bf16_supported(device):
        return torch.bfloat16
    return torch.float16 if device.startswith("cuda") else torch.float32


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


DECODE_WEIGHTS = ("auto", "int4", "int8", "model")


def pick_decode_weights(device: str, dtype: str = "auto", decode_weights: str = "auto") -> str:
    """What decode steps read (``decode_weights.py``): ``int4`` (4-bit groups where a weight already lies on them,
    int8 rows elsewhere), ``int8`` copies of the linear layers, or the ``model``'s own weights. ``auto``: int4 on a
    CPU that computes bf16 natively when the dtype is ``auto`` too (PyTorch's quantized kernels are fast with bf16
    activations, slow with fp32 ones); a dtype asked for by name (``float32``, the reference path) keeps its own
    weights, so its answers stay the reference."""
    if decode_weights not in DECODE_WEIGHTS:
        raise EngrainError(f"Unknown model.decode_weights '{decode_weights}'.",
                           hint="Use one of: " + ", ".join(DECODE_WEIGHTS) + ".")
    if decode_weights == "auto":
        return "int4" if device == "cpu" and dtype == "auto" and bf16_supported(device) else "model"
    return decode_weights


def load_model(spec: str | None = None, device: str | None = None, dtype: str = "auto",
               decode_weights: str = "auto", compile_decode: bool = False, prefill_dtype: str = "auto") -> LM:
    """Load a model by spec (see module docstring); the embedded default when ``spec`` is None. ``decode_weights``:
    see ``pick_decode_weights``; ``compile_decode``: see ``compiled_decode.py``; ``prefill_dtype``: the dtype of the
    linear layers' packed copy for many-token forwards of a bf16 model on a CPU (``prefill_dtype_for``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    decode = pick_decode_weights(device, dtype, decode_weights)  # bad values refused before the load
    prefill = prefill_dtype_for(device, prefill_dtype)
    name, path = resolve_model(spec)
    t0 = time.time()
    torch_dtype = pick_dtype(device, dtype)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a cached load takes a second; a bar per load is noise
    for attempt in range(2):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            # No hub kernels: transformers would fetch and run kernel code from the network for some layers on a
            # GPU (and fail offline); engrain answers and trains with the model's own modules everywhere.
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_kernels=False)
            break
        except OSError as exc:
            if name == EMBEDDED_NAME and attempt == 0:
                # The cache passed its size check but does not load: rebuild it once.
                note(f"engrain: cached model failed to load ({exc}); rebuilding it")
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
    from . import compiled_decode, decode_weights, packed_weights

    setattr(model, decode_weights.ATTRIBUTE, decode)
    setattr(model, packed_weights.ATTRIBUTE, prefill)
    if prefill == "int8":
        setattr(model, packed_weights.CALIBRATION, packed_weights.calibration_ids(tokenizer))
    setattr(model, compiled_decode.ATTRIBUTE, compile_decode)
    return LM(model=model, tokenizer=prepare_tokenizer(tokenizer), name=name, path=path, device=device,
              load_seconds=time.time() - t0)


def answering_lm(lm: LM) -> LM:
    """``lm`` as answers are generated: when its weights are not in the dtype ``auto`` picks for its device (a
    model loaded in fp32 to be trained), a copy converted to that dtype (bf16 where native); else ``lm`` itself."""
    import copy
    import dataclasses

    dtype = pick_dtype(lm.device)
    if next(lm.model.parameters()).dtype == dtype:
        return lm
    return dataclasses.replace(lm, model=copy.deepcopy(lm.model).to(dtype))


def load_for_workspace(workspace: Path | str, spec: str | None = None, device: str | None = None) -> LM:
    """The model a workspace answers with: ``spec`` when given, else its engrain.yaml's ``model.name`` (the
    embedded default when unset), in its ``model.dtype`` and ``model.device``, decoding with its
    ``model.decode_weights`` (compiled where ``model.compile_decode`` says)."""
    from ..config import load_config
    from ..workspace import Workspace

    cfg = load_config(Workspace.at(workspace).config_path).model
    return load_model(spec or cfg.name, device=device or cfg.device, dtype=cfg.dtype,
                      decode_weights=cfg.decode_weights, compile_decode=cfg.compile_decode,
                      prefill_dtype=cfg.prefill_dtype)
