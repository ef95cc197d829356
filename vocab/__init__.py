"""Vocabulary trimming of byte-level BPE code models: keep the tokens a code corpus uses (plus bytes, special
tokens and merge intermediates), slice the embedding and head rows, save a plain HF directory.

    from vocab import VocabConfig, trim_to_dir
    metrics = trim_to_dir("qwen2.5-coder-0.5b", VocabConfig(keep=32768), Path("out/vocab"))
"""

from vocab.bpe import BYTE_SYMBOLS, ByteLevelBPE
from vocab.config import VocabConfig
from vocab.errors import VocabError
from vocab.model import slice_vocab
from vocab.roundtrip import battery, roundtrip_failures
from vocab.select import select_tokens
from vocab.stage import plan_tokens, read_bpe, save_trimmed_tokenizer, trim_to_dir, write_trimmed

__all__ = [
    "BYTE_SYMBOLS", "ByteLevelBPE", "VocabConfig", "VocabError", "battery", "plan_tokens", "read_bpe",
    "roundtrip_failures", "save_trimmed_tokenizer", "select_tokens", "slice_vocab", "trim_to_dir", "write_trimmed",
]
