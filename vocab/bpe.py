"""Byte-level BPE as stored in a ``tokenizers`` ``tokenizer.json``: read its vocab, merges and added tokens,
and write a restricted copy with ids remapped densely.

Why restriction is safe (GPT-2 style byte-level BPE, Sennrich et al. 2016 + Radford et al. 2019): a word is
split into its UTF-8 bytes, each mapped to one of 256 byte symbols, then merges are applied in rank order.
Keeping all 256 byte symbols, and a merge ``a + b = c`` only when ``a``, ``b`` and ``c`` are all kept, means
every step produces a kept token, so any text still encodes (falling back to shorter pieces, at worst bytes)
and decodes back. A word whose original tokens are all kept, with their merge ancestors, is applied the same
merges in the same order, so its tokenization does not change.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tokenizers.pre_tokenizers import ByteLevel

from vocab.errors import VocabError

SUPPORTED = ("byte-level BPE tokenizer.json (model BPE + ByteLevel pre-tokenizer/decoder: GPT-2, Qwen2, "
             "SmolLM2, StarCoder, Llama-3 style)")
BYTE_SYMBOLS: tuple[str, ...] = tuple(sorted(ByteLevel.alphabet()))


@dataclass
class ByteLevelBPE:
    """The parts of a byte-level BPE ``tokenizer.json`` that trimming touches (ids are the original ones)."""

    spec: dict[str, Any]  # the whole tokenizer.json, untouched
    vocab: dict[str, int]  # model vocab
    merges: list[tuple[str, str]]  # in rank order
    added: dict[str, int]  # added/special tokens (some also live in ``vocab``)

    @classmethod
    def from_json(cls, spec: dict[str, Any]) -> ByteLevelBPE:
        """Parse and validate; anything but byte-level BPE raises VocabError naming what is supported."""
        model = spec.get("model") or {}
        kind = model.get("type") or ("BPE" if "merges" in model else None)
        if kind != "BPE":
            raise VocabError(f"tokenizer model type {kind!r} cannot be trimmed; supported: {SUPPORTED}. "
                             f"Unigram/WordPiece/WordLevel vocabularies have no byte fallback to keep every "
                             f"text encodable.")
        if not (_has_type(spec.get("pre_tokenizer"), "ByteLevel") and _has_type(spec.get("decoder"), "ByteLevel")):
            raise VocabError(f"BPE tokenizer without a ByteLevel pre-tokenizer and decoder (e.g. SentencePiece "
                             f"BPE with <0xNN> byte fallback) cannot be trimmed; supported: {SUPPORTED}")
        vocab = dict(model["vocab"])
        merges = [_merge_pair(m) for m in model.get("merges", [])]
        missing = [s for s in BYTE_SYMBOLS if s not in vocab]
        # SmolLM2 lacks 21 (bytes never valid in UTF-8, a few control characters): those texts lose the same
        # characters before and after trimming. Far more missing means this is not a byte-level vocabulary.
        if len(missing) > 64:
            raise VocabError(f"the BPE vocab lacks {len(missing)} of the 256 byte symbols (e.g. {missing[:3]}): "
                             f"not a byte-level vocabulary; supported: {SUPPORTED}")
        added = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])}
        return cls(spec=spec, vocab=vocab, merges=merges, added=added)

    @property
    def n_ids(self) -> int:
        """One past the largest id (model vocab and added tokens)."""
        return max([*self.vocab.values(), *self.added.values()]) + 1

    @property
    def missing_bytes(self) -> list[str]:
        """Byte symbols the original vocab lacks (text needing them did not encode before trimming either)."""
        return [s for s in BYTE_SYMBOLS if s not in self.vocab]

    def base_ids(self) -> set[int]:
        """The ids every trim keeps: the byte symbols (all 256 the vocab has) and every added/special token."""
        return {self.vocab[s] for s in BYTE_SYMBOLS if s in self.vocab} | set(self.added.values())

    def parents(self) -> dict[int, list[tuple[int, int]]]:
        """id of ``c`` -> every ``(id a, id b)`` with a merge ``a + b = c`` (usually one)."""
        out: dict[int, list[tuple[int, int]]] = {}
        for a, b in self.merges:
            c = self.vocab.get(a + b)
            if c is not None and a in self.vocab and b in self.vocab:
                out.setdefault(c, []).append((self.vocab[a], self.vocab[b]))
        return out

    def restrict(self, kept: Iterable[int]) -> tuple[dict[str, Any], dict[int, int]]:
        """A new tokenizer.json keeping the ``kept`` ids (remapped densely in their original order) and the
        merges whose three tokens are kept; returns it and the old -> new id map."""
        old_to_new = {old: new for new, old in enumerate(sorted(set(kept)))}
        spec = copy.deepcopy(self.spec)
        spec["model"]["vocab"] = {t: old_to_new[i] for t, i in self.vocab.items() if i in old_to_new}
        keep_tok = spec["model"]["vocab"]
        raw = self.spec["model"].get("merges", [])
        spec["model"]["merges"] = [m for m, (a, b) in zip(raw, self.merges, strict=True)
                                   if a in keep_tok and b in keep_tok and a + b in keep_tok]
        for tok in spec.get("added_tokens", []):
            if int(tok["id"]) not in old_to_new:
                raise VocabError(f"added token {tok['content']!r} (id {tok['id']}) is not in the kept set; "
                                 f"added tokens must always be kept")
            tok["id"] = old_to_new[int(tok["id"])]
        spec["post_processor"] = _remap_post_processor(spec.get("post_processor"), old_to_new)
        return spec, old_to_new


def _merge_pair(m: Any) -> tuple[str, str]:
    if isinstance(m, str):
        a, sep, b = m.partition(" ")
        if not sep:
            raise VocabError(f"merge {m!r} is not 'a b'; the tokenizer.json looks corrupt")
        return a, b
    a, b = m
    return a, b


def _has_type(node: Any, name: str) -> bool:
    """Whether a pre-tokenizer/decoder (possibly a Sequence of them) contains one of type ``name``."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == name:
        return True
    return any(_has_type(n, name) for key in ("pretokenizers", "decoders") for n in node.get(key, []))


def _remap_post_processor(node: Any, old_to_new: dict[int, int]) -> Any:
    """Special-token ids inside the post-processor (TemplateProcessing, Roberta/Bert, Sequence) follow the remap."""
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if kind == "Sequence":
        node["processors"] = [_remap_post_processor(p, old_to_new) for p in node.get("processors", [])]
    elif kind == "TemplateProcessing":
        for tok in node.get("special_tokens", {}).values():
            tok["ids"] = [_new_id(i, old_to_new, tok.get("id")) for i in tok["ids"]]
    elif kind in ("RobertaProcessing", "BertProcessing"):
        for key in ("sep", "cls"):
            if key in node:
                node[key] = [node[key][0], _new_id(node[key][1], old_to_new, node[key][0])]
    elif kind != "ByteLevel":
        raise VocabError(f"post-processor type {kind!r} is not handled; supported post-processors: ByteLevel, "
                         f"TemplateProcessing, RobertaProcessing, BertProcessing, Sequence of these")
    return node


def _new_id(old: int, old_to_new: dict[int, int], name: Any) -> int:
    if int(old) not in old_to_new:
        raise VocabError(f"post-processor token {name!r} (id {old}) was not kept; special tokens must be kept")
    return old_to_new[int(old)]
