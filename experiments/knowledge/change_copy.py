"""A copy of a workspace whose trained LoRA memory answers with its learned change cut to some layers, or
replaced by a random change of the same size.

    python experiments/knowledge/change_copy.py WS layers FIRST-LAST NEW_WS
    python experiments/knowledge/change_copy.py WS random SEED NEW_WS
    python experiments/knowledge/change_copy.py WS norms

The change LoRA adds to a weight is (lora_alpha / r) * B A. `layers` zeroes B outside decoder layers FIRST..LAST
(counted from 0): the change taken out of the other layers, nothing retrained, the way scaled_copy.py scales all of
it. `random` replaces every projection's B and A with Gaussian factors of the same shapes (the same rank), scaled
so that B A has the learned change's Frobenius norm in that projection: what a change of that size in no learned
direction does to the model. `engrain compare -w NEW_WS --methods lora`, with the config the memory was trained
with, then measures the copy (nothing is retrained: the meta still records that config). `norms` prints each
layer's share of the learned change's squared norm.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LAYER = re.compile(r"\.layers\.(\d+)\.")


def _adapter(ws: Path) -> Path:
    path = ws / "memories" / "lora" / "adapter_model.safetensors"
    if not path.is_file():
        sys.exit(f"{path} does not exist: train the lora memory in {ws} first")
    return path


def _layer(key: str) -> int:
    found = LAYER.search(key)
    if found is None:
        sys.exit(f"{key}: not a decoder layer's LoRA weight; this script knows only layers.N keys")
    return int(found.group(1))


def _pairs(weights: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(B's key, A's key) of every adapted projection."""
    return [(key, key.replace(".lora_B.", ".lora_A.")) for key in sorted(weights) if ".lora_B." in key]


def norms(ws: Path) -> None:
    weights = load_file(_adapter(ws))
    per_layer: dict[int, float] = {}
    for b, a in _pairs(weights):
        delta = weights[b].float() @ weights[a].float()
        per_layer[_layer(b)] = per_layer.get(_layer(b), 0.0) + float(delta.square().sum())
    total = sum(per_layer.values())
    for layer, value in sorted(per_layer.items()):
        print(f"layer {layer:2d}  {value / total:6.1%}")


def keep_layers(weights: dict[str, torch.Tensor], first: int, last: int) -> str:
    outside = [b for b, _ in _pairs(weights) if not first <= _layer(b) <= last]
    for b in outside:
        weights[b] = torch.zeros_like(weights[b])
    return f"the change kept in layers {first}-{last}, taken out of {len(outside)} projections"


def randomize(weights: dict[str, torch.Tensor], seed: int) -> str:
    generator = torch.Generator().manual_seed(seed)
    for b, a in _pairs(weights):
        size = (weights[b].float() @ weights[a].float()).norm()
        new_b = torch.randn(weights[b].shape, generator=generator)
        new_a = torch.randn(weights[a].shape, generator=generator)
        # B A scales with the product of the two factors' scales: split the correction evenly between them.
        factor = (size / (new_b @ new_a).norm()).sqrt()
        weights[b] = (new_b * factor).to(weights[b].dtype)
        weights[a] = (new_a * factor).to(weights[a].dtype)
    return f"every projection's change replaced by a random one of the same norm (seed {seed})"


def main() -> None:
    args = sys.argv[1:]
    if len(args) == 2 and args[1] == "norms":
        norms(Path(args[0]))
        return
    if len(args) != 4 or args[1] not in ("layers", "random"):
        sys.exit(__doc__)
    src, how, what, dst = Path(args[0]), args[1], args[2], Path(args[3])
    if how == "layers" and not re.fullmatch(r"\d+-\d+", what) or how == "random" and not what.isdigit():
        sys.exit(__doc__)
    weights = load_file(_adapter(src))
    if dst.exists():
        sys.exit(f"{dst} exists; remove it or pick another folder")
    if how == "layers":
        first, last = (int(n) for n in what.split("-"))
        done = keep_layers(weights, first, last)
    else:
        done = randomize(weights, int(what))
    # The trained memory and what compare needs to find it built; checkpoints and reports stay behind.
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "reports"))
    save_file(weights, str(_adapter(dst)), metadata={"format": "pt"})
    print(f"{dst}: {done}")


if __name__ == "__main__":
    main()
