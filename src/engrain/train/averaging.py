"""An exponential moving average of a run's trainable weights (Polyak averaging): with ``train.ema_horizon`` set, the
weights each evaluation judges and the memory keeps are the average, not the last step's."""

from __future__ import annotations

import contextlib


class WeightAverage:
    """The average of every trainable parameter, in fp32, updated after each optimizer step."""

    def __init__(self, module, horizon_steps: float) -> None:
        import torch

        self.decay = 1.0 - 1.0 / max(1.0, horizon_steps)
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        # Started at zero and divided by (1 - decay^t) when read (as Adam corrects its moments): the average of the
        # steps so far, none of them counted twice, however short the run.
        self.average = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.updates = 0

    def update(self) -> None:
        import torch

        self.updates += 1
        with torch.no_grad():
            for n, p in self.params.items():
                self.average[n].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def averaged(self) -> dict:
        """The moving average of the weights after the updates so far (the weights themselves before any)."""
        if self.updates == 0:
            return {n: p.detach().float() for n, p in self.params.items()}
        scale = 1.0 - self.decay ** self.updates
        return {n: t / scale for n, t in self.average.items()}

    def copy_into_params(self) -> None:
        import torch

        with torch.no_grad():
            for n, t in self.averaged().items():
                self.params[n].copy_(t)

    @contextlib.contextmanager
    def swapped_in(self):
        """The parameters hold the average inside the block and their trained values again after it."""
        import torch

        trained = {n: p.detach().clone() for n, p in self.params.items()}
        self.copy_into_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(trained[n])

    def state(self) -> dict:
        """The average's tensors, for a checkpoint (its update count is the checkpoint's step: one per step)."""
        return {n: t.contiguous() for n, t in self.average.items()}

    def load(self, tensors: dict, updates: int) -> None:
        import torch

        with torch.no_grad():
            for n, t in tensors.items():
                self.average[n].copy_(t)
        self.updates = updates
