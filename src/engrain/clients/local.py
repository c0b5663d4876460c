"""A local transformers model as a generator: chat template + batched ``models.generate``."""

from __future__ import annotations

import time

from ..models import LM, chat_prompt, generate
from .completion import Completion, Usage


class LocalGenerator:
    def __init__(self, lm: LM, batch_size: int = 32) -> None:
        self.lm = lm
        self.batch_size = batch_size
        self.name = f"local:{lm.name}"
        self.usage = Usage()

    def count_tokens(self, text: str) -> int:
        return len(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat(self, conversations: list[list[dict]], *, max_tokens: int, temperature: float = 0.8,
             top_p: float = 0.95, seed: int | None = None, stop: list[str] | None = None) -> list[Completion]:
        if not conversations:
            return []
        t0 = time.time()
        prompts = [chat_prompt(self.lm.tokenizer, msgs) for msgs in conversations]
        gens = generate(self.lm, prompts, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                        stop=stop, batch_size=self.batch_size, seed=seed)
        self.usage.requests += len(gens)
        self.usage.prompt_tokens += sum(g.prompt_tokens for g in gens)
        self.usage.completion_tokens += sum(g.completion_tokens for g in gens)
        self.usage.seconds += time.time() - t0
        return [Completion(g.text, g.prompt_tokens, g.completion_tokens, g.finish_reason) for g in gens]
