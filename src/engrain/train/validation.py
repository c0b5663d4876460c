"""What a checkpoint is judged by: validation loss, and the share of held-out facts' questions it answers.
"""

from __future__ import annotations

from ..config import TrainConfig
from ..models import end_of_turn
from .data import IGNORE, Example
from .packing import Row, collate, loss_sum


def evaluate_loss(module, val_rows: list[Row], cfg: TrainConfig, pad_id: int, packing: bool, device) -> float | None:
    import torch

    if not val_rows:
        return None
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val_rows), cfg.micro_batch):
            s, n = loss_sum(module, collate(val_rows[i:i + cfg.micro_batch], pad_id, packing, device), packing)
            total, count = total + float(s), count + n
    module.train(was_training)
    return total / max(1, count)


ANSWER_HEAD = 8  # answer tokens that must come out right for a held-out question to count as answered


def answered_share(module, examples: list[Example], tokenizer, device, batch: int = 8) -> float | None:
    """Share of the held-out questions whose answer greedy decoding gives, closed-book: the model's most likely
    token is the answer's at each of its first ``ANSWER_HEAD`` positions, read from one teacher-forced
    forward per batch, so it costs a validation pass, not a generation. Choosing the checkpoint by it picks the
    memory that answers facts it was never quizzed on, which item loss does not measure. None without questions."""
    import torch

    from .distill import first_loss_index

    asks = [e for e in examples if (first_loss_index(e.labels, IGNORE) or 0) > 1]
    if not asks:
        return None
    n_end = len(tokenizer(end_of_turn(tokenizer), add_special_tokens=False)["input_ids"])
    was_training = module.training
    module.eval()
    right = 0
    with torch.no_grad():
        for b in range(0, len(asks), batch):
            part = asks[b:b + batch]
            width = max(len(e.ids) for e in part)
            ids = torch.full((len(part), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, e in enumerate(part):
                ids[i, :len(e.ids)], mask[i, :len(e.ids)] = torch.tensor(e.ids), 1
            guess = module(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.argmax(-1).cpu()
            for i, e in enumerate(part):
                j = first_loss_index(e.labels, IGNORE)
                # the answer's first ANSWER_HEAD tokens (a long completion's tail is not the fact), no end of turn
                stop = min(max(j + 1, len(e.ids) - n_end), j + ANSWER_HEAD)
                right += int(torch.equal(guess[i, j - 1:stop - 1], torch.tensor(e.ids[j:stop])))
    module.train(was_training)
    return right / len(asks)
