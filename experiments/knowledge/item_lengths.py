"""How many of a workspace's training items are longer than a row of N tokens, overall and among the open-book items
(those with chunks in their prompt): the items `train.seq_len: N` would cut, and that `train.pack_tokens: N` keeps
whole in rows of their own.

    python experiments/knowledge/item_lengths.py WS [--tokens 512]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engrain.models.load import load_tokenizer
from engrain.train.data import encode_item, read_synthetic
from engrain.workspace import Workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    tokenizer = load_tokenizer()
    lengths = [(len(encode_item(tokenizer, item, key).ids), bool(item.get("context")))
               for key, item in read_synthetic(Workspace.at(args.workspace))]
    open_book = [n for n, context in lengths if context]
    print(f"items: {len(lengths)}, longer than {args.tokens} tokens: {sum(n > args.tokens for n, _ in lengths)}")
    print(f"open-book items: {len(open_book)}, longer than {args.tokens} tokens: "
          f"{sum(n > args.tokens for n in open_book)}")
    print(f"longest: {max(n for n, _ in lengths)} tokens")


if __name__ == "__main__":
    main()
