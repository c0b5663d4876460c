"""A copy of a workspace whose trained LoRA memory answers with its weight change scaled by S.

    python experiments/knowledge/scaled_copy.py WS S NEW_WS

PEFT adds (lora_alpha / r) * B A to each weight, so writing lora_alpha * S into the copy's adapter_config.json
scales the whole learned change by S (S = 1 is the memory as trained, S = 0 the base model), with nothing retrained:
interpolating between the base and the fine-tuned weights, as WiSE-FT does. `engrain compare -w NEW_WS --methods
lora` then measures the scaled memory with everything else unchanged (the meta still records the training config,
so nothing is retrained).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, scale, dst = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
    adapter = src / "memories" / "lora" / "adapter_config.json"
    if not adapter.is_file():
        sys.exit(f"{adapter} does not exist: train the lora memory in {src} first")
    if dst.exists():
        sys.exit(f"{dst} exists; remove it or pick another folder")
    # The trained memory and what compare needs to find it built; checkpoints and reports stay behind.
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "reports"))
    path = dst / "memories" / "lora" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["lora_alpha"] = config["lora_alpha"] * scale
    path.write_text(json.dumps(config, indent=2))
    print(f"{dst}: lora_alpha {config['lora_alpha']:.3g} (x{scale:g} of the trained memory's)")


if __name__ == "__main__":
    main()
