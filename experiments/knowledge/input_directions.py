"""How much of the documents' inputs `train.lora_null_share` keeps out, against how much of the replay's.

    python experiments/knowledge/input_directions.py WS [--shares 0.25,0.5,0.75]

Builds WS's training plan at its engrain.yaml (the replay as the run trains on it, the synthetic items), forwards the
base model over each (up to engrain/train/null_space.py's token budget), and prints, for each share, the part of each
set's input energy that lies in the kept-out directions, averaged over every LoRA layer, for both rankings of the
directions: by the replay's energy ("most used") and by the replay's relative to the documents'
(`train.lora_null_relative`). The protection a share buys and what it costs the documents, before any training.
"""

from __future__ import annotations

import argparse

from engrain.config import load_config
from engrain.memory.parametric import get_kind
from engrain.models import load_model
from engrain.train.loop import with_kind_defaults
from engrain.train.null_space import input_covariances, projection_off, projection_off_relative
from engrain.train.plan import make_plan
from engrain.train.precision import use_bf16
from engrain.workspace import Workspace


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("workspace")
    parser.add_argument("--shares", default="0.25,0.5,0.75")
    args = parser.parse_args()
    ws = Workspace.at(args.workspace)
    lm = load_model(None, dtype="float32")
    kind = get_kind("lora")
    cfg = with_kind_defaults(load_config(ws.config_path).train.model_copy(update={"memory": "lora"}), kind)
    plan = make_plan(ws, lm, cfg, world=1, packing=True, teacher=False, show=False)
    module = kind.attach(lm.model, lm.tokenizer, cfg.model_dump(), ws)  # B is zero: the base model's inputs
    bf16 = use_bf16(cfg.bf16, lm.device)
    sets = {"replay": [ex.ids for ex in plan.train if ex.kind == "replay"],
            "documents": [ex.ids for ex in plan.train if ex.kind != "replay"]}  # what a run reads
    covariances = {name: input_covariances(module, ids, lm.device, bf16) for name, ids in sets.items()}
    print(f"{len(covariances['replay'])} LoRA layers; share of each set's input energy kept out, mean over layers")
    replay, documents = covariances["replay"], covariances["documents"]
    for share in (float(s) for s in args.shares.split(",")):
        for ranking in ("most used", "relative"):
            kept_out = {name: [] for name in covariances}
            projections: dict[int, object] = {}  # layers that read one input share its projection
            for layer in replay:
                key = id(replay[layer])
                if key not in projections:
                    projections[key] = (projection_off(replay[layer], share) if ranking == "most used"
                                        else projection_off_relative(replay[layer], documents[layer], share))
                p = projections[key]
                for name, by_layer in covariances.items():
                    cov = by_layer[layer]
                    kept_out[name].append(1.0 - float(torch.trace(p @ cov @ p) / torch.trace(cov)))
            print(f"share {share}, {ranking}: replay {sum(kept_out['replay']) / len(replay):.3f}, "
                  f"documents {sum(kept_out['documents']) / len(replay):.3f}")


if __name__ == "__main__":
    main()
