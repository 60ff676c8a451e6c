"""Shared pieces of the image–text scorers (CLIP score, HPSv2, PickScore, ImageReward).

Everything here re-implements documented behaviour (evaluation spec §3, §5–§8, §10) on top of
``torch``, ``PIL``, ``numpy`` and ``transformers``; nothing imports torchvision, timm or open_clip.

* :mod:`.images` – image inputs, torchvision/transformers-style resize, crop and normalisation.
* :mod:`.tokenizer` – CLIP BPE vocabulary files, tokenizer loading, open_clip-style token ids.
* :mod:`.checkpoints` – load errors and reports, state-dict files, key renaming, weight hashes.
* :mod:`.clip_model` – open_clip → transformers CLIP conversion and :func:`load_clip_model`.
* :mod:`.embeddings` – projected embeddings from model outputs, text-pooling check.
* :mod:`.base` – the :class:`PairScorer` base class and dtype/device helpers.

Import each name from the module that defines it.
"""
