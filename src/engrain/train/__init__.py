"""Training a parametric memory, in the order the data flows:

- ``data``         synthetic items -> token ids and labels; the fact-level validation split
- ``replay``       general data mixed in against forgetting
- ``distill``      teacher targets: the base model reading the source chunks, or the base model itself on replay
- ``packing``      examples packed into rows, and the loss of a batch
- ``plan``         what a run will do (examples, split, steps, tokens) and the ``--dry-run`` report
- ``validation``   validation loss and the share of held-out facts answered
- ``checkpoints``  checkpoints, resume, and the finished memory saved by its kind
- ``loop``         ``train()``: resume or start, the optimizer steps, evaluation, the kept weights saved
- ``update``       ``engrain update``: a trained memory taught the new and changed documents, with rehearsal
- ``kernels/``     the trainer's fast paths (packed attention, the fused head loss, LoRA layers, casts)
"""
