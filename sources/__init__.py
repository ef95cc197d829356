"""Where inputs come from: models (embedded, local, GGUF, hub), code corpora, instruction data, HumanEval."""

from .corpus import CorpusSplit, batches_digest, calibration_batches, code_split, token_stream
from .embedded import DEFAULT_MODEL, EMBEDDED, FAST_MODEL
from .errors import SourceError
from .models import cache_root, load_model, pick_device, resolve_model_dir

__all__ = [
    "DEFAULT_MODEL", "EMBEDDED", "FAST_MODEL", "CorpusSplit", "SourceError", "batches_digest", "cache_root",
    "calibration_batches", "code_split", "load_model", "pick_device", "resolve_model_dir", "token_stream",
]
