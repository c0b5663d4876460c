"""What a checkpoint is judged by: validation loss, and the share of held-out facts' questions it answers, both read
from one forward over the validation rows.
"""

from __future__ import annotations

from ..models import end_of_turn
from .data import IGNORE, Example
from .kernels.head_loss import CHUNK
from .packing import collate, loss_positions, outputs_at, pack, unpacked_rows

ANSWER_HEAD = 8  # answer tokens that must come out right for a held-out question to count as answered


def answer_positions(example: Example, n_end: int, seq_len: int) -> list[int] | None:
    """The token positions of a held-out question's answer that greedy decoding must give: the first
    ``ANSWER_HEAD`` of those whose token the question does not already hold, no end of turn. A wh-question is
    answered by its whole statement, which restates the question's words: judged on all of its first tokens, a
    memory that only repeats the question counts as answering it (experiments/knowledge's acme-demo-2.75-epochs row:
    its training log beside its results shows how many did so early on). None for an example that asks nothing (its
    loss is not one tail after a prompt), whose answer the question holds whole, or whose judged tokens are cut off
    at ``seq_len``."""
    from .distill import first_loss_index

    j = first_loss_index(example.labels, IGNORE)
    if j is None or j <= 1:
        return None
    asked = set(example.ids[:j])
    stop = max(j + 1, len(example.ids) - n_end)
    new = [t for t in range(j, stop) if example.ids[t] not in asked][:ANSWER_HEAD]
    return new if new and new[-1] < seq_len else None


def evaluate(module, examples: list[Example], tokenizer, *, micro_batch: int, seq_len: int, packing: bool,
             device) -> tuple[float | None, list[bool] | None]:
    """(validation loss, whether each held-out question was answered) of the validation ``examples``, packed as
    training packs them (or one per row). A question counts as answered when the model's most likely token is the
    answer's at each position ``answer_positions`` names: greedy decoding closed-book, read from the same
    teacher-forced forward as the loss, so judging a checkpoint costs one validation pass, not a generation.
    Choosing the checkpoint by it picks the memory that answers facts it was never quizzed on, which item loss does
    not measure. (None, None) without examples; the answers are None without questions."""
    import torch
    import torch.nn.functional as F

    if not examples:
        return None, None
    rows = pack(examples, seq_len) if packing else unpacked_rows(examples, seq_len)
    n_end = len(tokenizer(end_of_turn(tokenizer), add_special_tokens=False)["input_ids"])
    # each example starts where its positions restart at 0: (row, offset) in the order the examples were packed
    starts = [(r, t) for r, row in enumerate(rows) for t, p in enumerate(row.positions) if p == 0]
    judged: dict[int, list[list[int]]] = {}  # row -> each question's judged positions in it
    for (r, t), example in zip(starts, examples):
        if (positions := answer_positions(example, n_end, seq_len)) is not None:
            judged.setdefault(r, []).append([t + p for p in positions])
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    answers: list[bool] = []  # per held-out question, in the same order at every evaluation of a run
    with torch.no_grad():
        for first in range(0, len(rows), micro_batch):
            batch = collate(rows[first:first + micro_batch], tokenizer.pad_token_id, packing, device)
            keep, targets = loss_positions(batch["labels"])
            outputs, head = outputs_at(module, batch, keep, packing)
            guesses = []
            for a in range(0, len(outputs), CHUNK):
                logits = outputs[a:a + CHUNK] if head is None else F.linear(outputs[a:a + CHUNK], head.weight)
                total += float(F.cross_entropy(logits.float(), targets[a:a + CHUNK], reduction="sum"))
                guesses.append(logits.argmax(-1))
            count += int(targets.numel())
            guess = torch.cat(guesses)
            at = keep.flatten().cumsum(0).view(keep.shape) - 1  # index into guess of each kept position
            for i in range(keep.shape[0]):
                for positions in judged.get(first + i, []):
                    # logits at t predict token t + 1: the answer's token at p is read at p - 1
                    at_p = torch.tensor(positions)
                    answers.append(torch.equal(guess[at[i, at_p - 1]], batch["labels"][i, at_p]))
    module.train(was_training)
    return total / max(1, count), (answers or None)
