"""Model plumbing of a vocabulary trim: keep the embedding and head rows of the kept ids, fix the config.

Row ``new`` of the trimmed embedding (and head) is row ``old`` of the original, so a kept token's vector and
logit are unchanged; the softmax now normalises over the kept tokens only. A tied head stays tied (one
matrix); an untied head is sliced with the same rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vocab.errors import VocabError

SPECIAL_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def slice_vocab(model: nn.Module, old_ids: list[int], old_to_new: dict[int, int]) -> dict[str, Any]:
    """Restrict ``model`` in place to the rows ``old_ids`` (sorted; new id = position) and remap the
    special-token ids of its config and generation config; returns what changed."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    n_rows = emb.weight.shape[0]
    if old_ids and old_ids[-1] >= n_rows:
        raise VocabError(f"the tokenizer has id {old_ids[-1]} but the embedding has {n_rows} rows; the "
                         f"model and tokenizer do not match")
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    index = torch.tensor(old_ids, dtype=torch.long, device=emb.weight.device)
    params_before = sum(p.numel() for p in model.parameters())
    new_emb = nn.Embedding(len(old_ids), emb.weight.shape[1], padding_idx=None, device=emb.weight.device,
                           dtype=emb.weight.dtype)
    new_emb.weight.data.copy_(emb.weight.data.index_select(0, index))
    model.set_input_embeddings(new_emb)
    if head is not None:
        if tied:
            new_head = nn.Linear(head.in_features, len(old_ids), bias=head.bias is not None,
                                 device=head.weight.device, dtype=head.weight.dtype)
            new_head.weight = new_emb.weight
        else:
            new_head = nn.Linear(head.in_features, len(old_ids), bias=head.bias is not None,
                                 device=head.weight.device, dtype=head.weight.dtype)
            new_head.weight.data.copy_(head.weight.data.index_select(0, index))
        if head.bias is not None:
            new_head.bias.data.copy_(head.bias.data.index_select(0, index))
        model.set_output_embeddings(new_head)
    model.config.vocab_size = len(old_ids)
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text_cfg.vocab_size = len(old_ids)
    dropped = _remap_ids(model.config, old_to_new)
    if getattr(model, "generation_config", None) is not None:
        dropped += _remap_ids(model.generation_config, old_to_new)
    params_after = sum(p.numel() for p in model.parameters())
    return {"tied": tied, "rows_before": n_rows, "rows_after": len(old_ids), "params_before": params_before,
            "params_after": params_after, "dropped_special_ids": sorted(set(dropped))}


def _remap_ids(cfg: Any, old_to_new: dict[int, int]) -> list[str]:
    """Map each special-token id field; an id with no token (not kept) becomes None and is reported."""
    dropped = []
    for field in SPECIAL_ID_FIELDS:
        value = getattr(cfg, field, None)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            new = [old_to_new[int(v)] for v in value if int(v) in old_to_new]
            if len(new) < len(value):
                dropped.append(field)
            setattr(cfg, field, new or None)
        else:
            if int(value) not in old_to_new:
                dropped.append(field)
            setattr(cfg, field, old_to_new.get(int(value)))
    return dropped
