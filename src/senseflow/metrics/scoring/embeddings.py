"""CLIP embeddings from transformers model outputs, and the text-pooling sanity check."""

from __future__ import annotations

from typing import Any

import torch


def embedding_from_output(output: Any) -> torch.Tensor:
    """The projected embedding from ``get_text_features``/``get_image_features``.

    transformers 4.x returns a tensor; 5.x returns ``BaseModelOutputWithPooling`` whose
    ``pooler_output`` holds the projected embedding (and a tuple ``(last_hidden_state,
    pooler_output, ...)`` when ``return_dict=False``).
    """
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(output, tuple) and len(output) >= 2 and isinstance(output[1], torch.Tensor):
        return output[1]
    raise TypeError(f"cannot find an embedding in a {type(output).__name__}")


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def check_text_pooling(model: Any, tokenizer: Any) -> None:
    """Refuse a text model that would pool at a token other than the tokenizer's EOT.

    transformers' CLIP text model pools at the first ``eos_token_id`` of its config, or at the
    highest token id when that is the legacy value 2 (open_clip's argmax rule).
    """
    eos = getattr(model.config.text_config, "eos_token_id", None)
    if eos not in (2, tokenizer.eos_token_id):
        raise ValueError(
            f"the text model pools at token id {eos} but the tokenizer's EOT is {tokenizer.eos_token_id}: "
            "model and tokenizer do not belong together"
        )


def clip_image_embeds(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    return embedding_from_output(model.get_image_features(pixel_values=pixel_values))


def clip_text_embeds(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    return embedding_from_output(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
