"""The server's continuous batching (``stream.Stream``): rows joining a running batch and leaving it get the
greedy tokens they get alone."""

from __future__ import annotations

from stream_loop import decode_all

from engrain.models import stream as stream_mod


def test_rows_joining_and_leaving_get_their_tokens_alone(tiny_lm):
    from engrain.models import fastgen

    tok = tiny_lm.tokenizer
    texts = ["hello there", "a much longer prompt about the lighthouse keeper and his log", "Hi", "What is 2+2?",
             "Tell me about the mill on the river", "ok"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    budgets = [3, 9, 5, 7, 2, 6]
    alone = [fastgen.generate_many(tiny_lm.model, [p], batch_size=1, max_new_tokens=n, stop_ids=[-1],
                                   pad_id=tok.pad_token_id)[0] for p, n in zip(prompts, budgets)]
    stream = stream_mod.Stream(tiny_lm.model, pad_id=tok.pad_token_id)
    got: dict[int, list[int]] = {}
    order: dict[int, int] = {}
    waiting = list(range(len(prompts)))
    steps = 0
    while waiting or len(stream):
        if waiting and (steps % 3 == 0 or not len(stream)):  # two prompts join every third step
            admit, waiting = waiting[:2], waiting[2:]
            handles = stream.admit([prompts[i] for i in admit], [budgets[i] for i in admit])
            order.update(zip(handles, admit))
        finished = set()
        for handle, token in stream.step():
            got.setdefault(order[handle], []).append(token)
            if order[handle] == 1 and len(got[1]) == 4:
                finished.add(handle)  # the caller ends a row early (a stop string, a client gone)
        stream.advance(finished)
        steps += 1
    assert got[1] == alone[1][:4]
    assert [got[i] for i in (0, 2, 3, 4, 5)] == [alone[i] for i in (0, 2, 3, 4, 5)]
    assert len(stream) == 0


def test_plain_attention_equals_sdpa_and_gives_padding_rows_no_nan():
    """The bf16 CPU form of the decode loop's attention: the same as SDPA with the same boolean mask (grouped
    query heads included), and a query that may see no key (left padding) comes out finite."""
    import torch
    import torch.nn.functional as F

    from engrain.models.fastgen import _plain_attend, mask_bias

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.ones(5, 7, dtype=torch.bool).tril(diagonal=2)[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, :3] = False  # row 1: three padding keys on the left
    mask[1, :, 0] = False  # and a padding query that sees nothing at all
    got = _plain_attend(q, k, v, mask_bias(mask, q.dtype), 0.3)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    seen = mask.any(-1).expand(2, 6, 5)
    torch.testing.assert_close(got[seen], ref[seen], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


def test_plain_attention_bias_and_scaled_queries_give_masked_fills_exact_result():
    """The mask added as a bias, and a power-of-two scale applied to the queries, give bit for bit what masked_fill
    on the scaled scores gives, in bf16 and fp32, with a padding query that sees nothing (one query block: the
    blocks are held to SDPA below)."""
    import torch

    from engrain.models import fastgen

    torch.manual_seed(0)
    t, s = 40, 49
    mask = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, :4] = False
    mask[1, :, 0] = False
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.randn(2, 6, t, 64).to(dtype)
        k, v = torch.randn(2, 2, s, 64).to(dtype), torch.randn(2, 2, s, 64).to(dtype)
        got = fastgen._plain_attend(q, k, v, fastgen.mask_bias(mask, dtype), 64 ** -0.5)
        scores = torch.matmul(q.reshape(2, 2, 3 * t, 64), k.transpose(2, 3)) * 64 ** -0.5
        scores = scores.view(2, 2, 3, t, s).masked_fill(~mask[:, :, None], torch.finfo(dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        want = torch.matmul(probs.view(2, 2, 3 * t, s), v).view(2, 6, t, 64)
        assert torch.equal(got, want), dtype


def test_plain_attention_in_query_blocks_equals_sdpa(monkeypatch):
    """A prefill longer than a query block runs block by block against the keys up to each block's last query; with
    earlier cache columns (a shared prompt start) and left padding it still equals SDPA over the whole mask."""
    import torch
    import torch.nn.functional as F

    from engrain.models import fastgen

    monkeypatch.setattr(fastgen, "QUERY_BLOCK", 4)
    torch.manual_seed(1)
    start, t = 3, 11  # 11 new queries: blocks of 4, 4 and 3
    q, k, v = torch.randn(2, 6, t, 8), torch.randn(2, 2, start + t, 8), torch.randn(2, 2, start + t, 8)
    mask = torch.ones(t, start + t, dtype=torch.bool).tril(diagonal=start)[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, start:start + 2] = False  # row 1: two padding tokens after the shared start
    got = fastgen._plain_attend(q, k, v, fastgen.mask_bias(mask, q.dtype), 0.3)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_prompts_starting_as_earlier_ones_reuse_their_kv_and_get_their_tokens_alone(tiny_lm):
    """With a prompt cache, a prompt that starts as an earlier one did runs only the rest of itself (the earlier
    prompt's KV fills the start) and decodes the greedy tokens it gets alone (fp32: exact)."""
    from engrain.models import fastgen
    from engrain.models.prompt_cache import PromptCache

    tok = tiny_lm.tokenizer
    system = "You answer questions about the lighthouse, the harbour and the mill of Tessly, in one sentence. "
    texts = [system + "Who kept the log?", system + "When was the pier built?", system + "Who kept the log?",
             "Hi there, who are you today?"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    alone = [fastgen.generate_many(tiny_lm.model, [p], batch_size=1, max_new_tokens=6, stop_ids=[-1],
                                   pad_id=tok.pad_token_id)[0] for p in prompts]
    cache = PromptCache()
    got = []
    for batch in ([0], [1, 2, 3]):  # a second request joins later, as a server's do
        stream = stream_mod.Stream(tiny_lm.model, pad_id=tok.pad_token_id, prompt_cache=cache)
        got += decode_all(stream, [prompts[i] for i in batch], 6)
    assert got == alone
    shared = fastgen.common_start([prompts[0], prompts[1]])
    assert cache.stats["hits"] == 2  # prompts 1 and 2 start as prompt 0; prompt 3 shares nothing with any
    assert cache.stats["tokens_reused"] == shared + len(prompts[0]) - 1  # all of prompt 2 but its last token
    assert len(cache.entries) == 3  # prompts 0, 1 and 3 (prompt 2 is prompt 0 again)


def test_prompts_after_different_cached_starts_share_one_forward_and_get_their_tokens_alone(tiny_lm, monkeypatch):
    """Prompts that continue different cached prompts (a whole earlier question, only its system prompt, nothing)
    are prefilled in one forward, each after its own start, and decode the greedy tokens they get alone (fp32)."""
    from engrain.models import fastgen
    from engrain.models.prompt_cache import PromptCache

    tok = tiny_lm.tokenizer
    system = "You answer questions about the lighthouse, the harbour and the mill of Tessly, in one sentence. "
    other = "You are a careful archivist of the Orvane records and you answer briefly and plainly. "
    texts = [system + "Who kept the log?", other + "Where are the maps?", system + "Who kept the log?",
             system + "When was the pier built?", other + "Where are the maps?", "Hi there, who are you today?"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    alone = [fastgen.generate_many(tiny_lm.model, [p], batch_size=1, max_new_tokens=6, stop_ids=[-1],
                                   pad_id=tok.pad_token_id)[0] for p in prompts]
    calls = []
    real = stream_mod.prefill_after_starts
    monkeypatch.setattr(stream_mod, "prefill_after_starts", lambda model, group, *a, **k: calls.append(len(group))
                        or real(model, group, *a, **k))
    cache = PromptCache()
    stream = stream_mod.Stream(tiny_lm.model, pad_id=tok.pad_token_id, prompt_cache=cache)
    got = decode_all(stream, prompts[:2], 6)
    got += decode_all(stream, prompts[2:], 6)  # after a whole earlier prompt, a system prompt, a whole one, nothing
    assert got == alone
    assert calls == [2, 4]  # one forward per admission
    assert cache.stats["hits"] == 3


def test_prompt_cache_keeps_its_byte_budget_dropping_the_least_recently_used():
    import torch

    from engrain.models.prompt_cache import PromptCache

    def kv(n):  # two layers of (1, 2 heads, n tokens, 4) in fp32: 2 * 2 * 32 n bytes
        return [(torch.zeros(1, 2, n, 4), torch.zeros(1, 2, n, 4)) for _ in range(2)]

    cache = PromptCache(max_bytes=2 * 2 * 32 * 30)  # thirty tokens' worth
    a, b, c = list(range(10)), list(range(100, 112)), list(range(200, 212))
    cache.add(a, kv(10))
    cache.add(b, kv(12))
    assert cache.match(a + [7, 8])[0] == 10  # a is now the most recently used
    cache.add(c, kv(12))  # 34 tokens: b, the least recently used, goes
    assert list(cache.entries) == [tuple(a), tuple(c)] and cache.bytes == 2 * 2 * 32 * 22
    assert cache.match(b + [1]) == (0, None)
    n, layers = cache.match(c[:9] + [5, 5])
    assert n == 9 and layers[0][0].shape == (1, 2, 9, 4)
    assert cache.match(a[:5] + [1, 2, 3]) == (0, None)  # fewer than MIN_TOKENS shared


def test_prompts_of_very_different_lengths_are_prefilled_apart():
    """On a CPU a prefill group pads to its longest prompt by at most PAD_SLACK more tokens than it holds, or
    PAD_TOKENS where that is more: similar lengths share a group, a short prompt is not padded to a long one, short
    prompts share one forward, and every prompt lands in exactly one group."""
    prompts = {0: [1] * 800, 1: [1] * 300, 2: [1] * 470, 3: [1] * 500, 4: [1] * 480, 5: [1] * 310}
    groups = stream_mod.length_groups(prompts)
    assert [sorted(g) for g in groups] == [[1, 5], [2, 3, 4], [0]]
    for g in groups:
        lengths = [len(p) for p in g.values()]
        padding = max(lengths) * len(lengths) - sum(lengths)
        assert padding <= max(stream_mod.PAD_TOKENS, stream_mod.PAD_SLACK * sum(lengths))
    # 20 and 60 tokens (what is left of two prompts after their cached starts) pad too much for one forward.
    assert [sorted(g) for g in stream_mod.length_groups({0: [1] * 20, 1: [1] * 60})] == [[0], [1]]
    # Short prompts share one forward though one is twice the other: a forward's fixed cost outweighs the padding.
    short = {0: [1] * 12, 1: [1] * 25, 2: [1] * 18}
    assert [sorted(g) for g in stream_mod.length_groups(short)] == [[0, 1, 2]]
    assert stream_mod.length_groups({}) == []


def test_prefilled_counts_the_tokens_each_forward_computed_and_its_padding(tiny_lm):
    """``Stream.prefilled``: two prompts in one length group count their own tokens and the shorter one's padding;
    the same prompt again, its KV cached, computes only its last token."""
    from engrain.models.prompt_cache import PromptCache

    tok = tiny_lm.tokenizer
    a = tok("the keeper of the lighthouse wrote in his log", add_special_tokens=False)["input_ids"]
    b = tok("the mill on the river", add_special_tokens=False)["input_ids"]
    stream = stream_mod.Stream(tiny_lm.model, pad_id=tok.pad_token_id, prompt_cache=PromptCache())
    stream.admit([a, b], [2, 2])
    assert stream.prefilled == {"tokens": len(a) + len(b), "padding": abs(len(a) - len(b))}
    stream.admit([a], [2])
    assert stream.prefilled["tokens"] == len(a) + len(b) + 1


def test_decode_steps_over_the_whole_cache_give_the_sliced_steps_logits(tiny_lm, monkeypatch):
    """A decode step attends the cache's whole buffer while its unwritten tail is short (``WHOLE_CACHE_RATIO``), the
    tail masked: the logits of every step are those of attending only the written columns, and a long tail (a large
    budget after a short prompt) keeps the slice."""
    import torch

    from engrain.models import fastgen

    assert fastgen.attended_columns(120, 100) == 120
    assert fastgen.attended_columns(300, 40) == 40
    tok = tiny_lm.tokenizer
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in
               ["the lighthouse keeper wrote in his log every night", "Hi", "What is 2+2?"]]

    def step_logits(ratio: float) -> list:
        monkeypatch.setattr(fastgen, "WHOLE_CACHE_RATIO", ratio)
        stream = stream_mod.Stream(tiny_lm.model, pad_id=tok.pad_token_id)
        stream.admit(prompts, [6, 6, 6])
        out = []
        while len(stream):
            stream.step()
            stream.advance(set())
            if stream.rows is not None:
                out.append(stream.rows.logits.clone())
        return out

    with torch.inference_mode():
        sliced, whole = step_logits(0), step_logits(1e9)
    assert len(sliced) == len(whole) == 5
    for a, b in zip(sliced, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_attention_through_sdpa_on_amx_agrees_with_the_plain_form(tiny_lm, monkeypatch):
    """Where the CPU has AMX tiles (``fastgen.amx_attention``) bf16 attention goes to SDPA's kernel: a prefill of
    left-padded prompts (a padding query sees no key) gives finite logits within bf16 rounding of the plain form's,
    and the same next tokens."""
    import copy

    import torch

    from engrain.models import fastgen

    model = copy.deepcopy(tiny_lm.model).to(torch.bfloat16)
    tok = tiny_lm.tokenizer
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in
               ("a much longer prompt about the lighthouse keeper and his log of ships", "Hi", "What is 2+2?")]
    logits = {}
    for amx in (True, False):
        monkeypatch.setattr(fastgen, "amx_attention", lambda device, amx=amx: amx)
        logits[amx] = fastgen._prefill(model, prompts, list(range(len(prompts))), tok.pad_token_id, None,
                                       "cpu").logits.float()
    assert torch.isfinite(logits[True]).all() and not torch.equal(logits[True], logits[False])  # two forms ran
    assert (logits[True] - logits[False]).abs().max() <= 0.05 * logits[False].abs().max()
    assert torch.equal(logits[True].argmax(-1), logits[False].argmax(-1))
