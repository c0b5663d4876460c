"""The trainer's fast paths: attention over packed rows, the head's loss without full logits, LoRA layers, and the
casts they share. ``bench/bench_train.py`` measures them."""
