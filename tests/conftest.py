"""Shared fixtures.

``tiny_lm``: a randomly initialised model of the embedded model's architecture (Llama) with the real
tokenizer: fast, for unit tests. ``embedded_lm``: the real SmolLM2-135M-Instruct (fetched and cached once
per ENGRAIN_HOME), for the few tests that must see real generation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="session")
def embedded_path() -> Path:
    from engrain.models import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="session")
def tokenizer(embedded_path):
    from transformers import AutoTokenizer

    from engrain.models import prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(embedded_path))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama saved like any Hugging Face model folder, so loading code is exercised for real."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_lm(tiny_model_dir):
    from engrain.models import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")  # the reference path; bf16 has its own tests


@pytest.fixture(scope="session")
def embedded_lm(embedded_path):
    from engrain.models import load_model

    return load_model(None, device="cpu", dtype="float32")
