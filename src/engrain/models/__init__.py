"""Base models: ``fetch`` (the embedded model and other specs resolved to a local folder), ``load`` (device, dtype,
tokenizer), ``prompts`` (chat template, documents before the question, raw continuation), ``stops`` (where decoding
ends), ``generation`` (answers for a batch of prompts) and ``fastgen`` (the KV-cached decode loop it uses).

The names below are the package's public API; every stage imports them from here."""

from __future__ import annotations

from .fetch import (
    ACCEPTED_SPECS,
    EMBEDDED_ALIASES,
    EMBEDDED_GGUF_NAME,
    EMBEDDED_NAME,
    EMBEDDED_WHEEL_NAME,
    EMBEDDED_WHEEL_PACKAGE,
    MANIFEST,
    cache_state,
    ensure_embedded_model,
    model_cache_dir,
    resolve_model,
)
from .generation import Generation, answer, continue_text, cut_continuation, fused_generate, generate
from .load import (
    LM,
    bf16_supported,
    bf16_trains_faster,
    cpu_model,
    default_device,
    answering_lm,
    load_for_workspace,
    load_model,
    load_tokenizer,
    pick_dtype,
    prepare_tokenizer,
)
from .prompts import (
    CHATML_TEMPLATE,
    DEFAULT_SYSTEM,
    chat_messages,
    chat_prompt,
    check_starts,
    context_question,
    continuation_prompt,
    end_of_turn,
    first_line,
    plain_chunks,
    render_chunks,
)
from .stops import line_break_ids, stop_index, stop_token_ids

__all__ = ['EMBEDDED_ALIASES', 'EMBEDDED_NAME', 'EMBEDDED_WHEEL_PACKAGE', 'EMBEDDED_WHEEL_NAME', 'EMBEDDED_GGUF_NAME', 'MANIFEST', 'ACCEPTED_SPECS', 'model_cache_dir', 'cache_state', 'ensure_embedded_model', 'resolve_model', 'default_device', 'bf16_supported', 'bf16_trains_faster', 'cpu_model', 'pick_dtype', 'LM', 'prepare_tokenizer', 'load_tokenizer', 'load_model', 'load_for_workspace', 'answering_lm', 'CHATML_TEMPLATE', 'DEFAULT_SYSTEM', 'chat_messages', 'context_question', 'chat_prompt', 'end_of_turn', 'continuation_prompt', 'render_chunks', 'plain_chunks', 'first_line', 'check_starts', 'stop_token_ids', 'line_break_ids', 'stop_index', 'Generation', 'generate', 'answer', 'cut_continuation', 'continue_text', 'fused_generate']
