"""Forward toolkit shared by lord, quant and evaluation (independent of all of them): the architecture
registry (``forward.arch``), the one next-token NLL (``forward.nll``) and layer-wise capture / replay / walk
(``forward.capture``). Imports only torch."""

from forward.arch import ARCHS, ArchAdapter, GroupSpec, LayerGroup, adapter_for
from forward.capture import (
    LayerCall,
    Stream,
    all_layer_inputs,
    capture,
    decoder_layers,
    logits_from,
    nll_from,
    run_from,
    run_layer,
    walk,
)
from forward.errors import ForwardError
from forward.nll import NLL, check_ids, head_nll, nll, token_nll

__all__ = [
    "ARCHS", "NLL", "ArchAdapter", "ForwardError", "GroupSpec", "LayerCall", "LayerGroup", "Stream", "adapter_for",
    "all_layer_inputs", "capture", "check_ids", "decoder_layers", "head_nll", "logits_from", "nll", "nll_from",
    "run_from", "run_layer", "token_nll", "walk",
]
