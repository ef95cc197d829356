"""Layer-wise forward: capture what decoder layer ``i`` is called with, run layers on captured inputs, finish
through the final norm and LM head, and walk the decoder layer by layer.

Why: GPTQ (Frantar et al. 2023, "sequential" quantization, cf. the ``Catcher`` of IST-DASLab/gptq llama.py),
loss probes and error-compensating decomposition all need a layer's *inputs* for a calibration batch, then
the model from that layer on. A decoder layer is called as ``layer(hidden, *args, **kwargs)`` where the
kwargs carry what the model computed once before the first layer (attention mask, rotary position
embeddings, position ids); a pre-hook captures them, and replaying the layers on the captured inputs gives
the full forward's result exactly (tests/test_forward.py).

A ``Stream`` is the hidden states of some batches at one depth; ``run_layer`` advances any stream through any
layer object, so two streams (e.g. dense and already-compressed inputs) can walk the same layers::

    dense = capture(model, ids, batch_size=4)       # inputs of layer 0
    comp = dense.copy()
    for i, layer in enumerate(decoder_layers(model)):
        x_dense, x_comp = dense.hidden, comp.hidden  # inputs of layer i from both streams
        dense.advance(layer)                         # dense outputs, before the layer is modified
        ...modify layer using x_dense / x_comp...
        comp.advance(layer)                          # inputs of layer i+1 under the modified layers
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from forward.arch import adapter_for
from forward.errors import ForwardError
from forward.nll import NLL, check_ids, head_nll

_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")


@dataclass(frozen=True)
class LayerCall:
    """Everything a decoder layer is called with besides the hidden states (per batch)."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """Output hidden states of ``layer`` on ``hidden`` (layers return a tensor or a tuple led by it)."""
    out = layer(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return adapter_for(model).decoder_layers(model)


class _Captured(Exception):
    pass


@dataclass
class Stream:
    """Hidden states of a list of batches at one depth, with each batch's ``LayerCall`` and token ids."""

    hidden: list[torch.Tensor]
    calls: list[LayerCall]
    ids: list[torch.Tensor]

    def copy(self) -> Stream:
        return Stream(list(self.hidden), list(self.calls), list(self.ids))

    def run(self, layer: nn.Module) -> list[torch.Tensor]:
        """Outputs of ``layer`` for every batch (hooks on its modules see every batch)."""
        return [run_layer(layer, h, c) for h, c in zip(self.hidden, self.calls, strict=True)]

    def advance(self, layer: nn.Module) -> None:
        """Replace the hidden states by ``layer``'s outputs: the stream is now one layer deeper."""
        self.hidden = self.run(layer)


@torch.no_grad()
def capture(model: nn.Module, ids: torch.Tensor, layer: int = 0, batch_size: int | None = None) -> Stream:
    """Inputs of decoder layer ``layer`` for ``ids`` [n, L] in batches of ``batch_size`` (default: one batch).

    Each batch runs the model only up to that layer (the pre-hook stops it), with ``use_cache=False``.
    """
    check_ids(ids)
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ForwardError(f"layer {layer} out of range: the model has {len(layers)} decoder layers")
    device = next(model.parameters()).device
    batches = list(ids.split(batch_size or ids.shape[0]))
    hidden: list[torch.Tensor] = []
    calls: list[LayerCall] = []

    def grab(_m, args, kwargs):
        kwargs = dict(kwargs)
        h = args[0] if args else kwargs.pop("hidden_states")
        for k in _CACHE_KWARGS:
            if k in kwargs:
                kwargs[k] = None
        hidden.append(h.detach())
        calls.append(LayerCall(tuple(args[1:]), kwargs))
        raise _Captured

    hook = layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for x in batches:
            try:
                model(input_ids=x.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        hook.remove()
    if len(hidden) != len(batches):
        raise ForwardError(f"captured the inputs of decoder layer {layer} for {len(hidden)} of {len(batches)} "
                           f"batches: {type(model).__name__} does not call its decoder layers in the usual way")
    return Stream(hidden, calls, [x.to(device) for x in batches])


def walk(model: nn.Module, stream: Stream, start: int = 0) -> Iterator[tuple[int, nn.Module]]:
    """Yield ``(i, layer)`` from layer ``start`` on, with ``stream`` holding layer ``i``'s inputs; when the
    caller's loop body is done (it may have modified or replaced the layer's modules), advance ``stream``
    through the layer so it holds layer ``i+1``'s inputs."""
    layers = decoder_layers(model)
    for i in range(start, len(layers)):
        yield i, layers[i]
        with torch.no_grad():
            stream.advance(layers[i])


@torch.no_grad()
def run_from(model: nn.Module, stream: Stream, start: int) -> list[torch.Tensor]:
    """Final-normed hidden states per batch, running layers ``start..`` on ``stream`` (holding layer ``start``'s
    inputs; the stream itself is not changed)."""
    layers = decoder_layers(model)
    norm = adapter_for(model).final_norm(model)
    out = []
    for h, call in zip(stream.hidden, stream.calls, strict=True):
        for layer in layers[start:]:
            h = run_layer(layer, h, call)
        out.append(norm(h))
    return out


@torch.no_grad()
def logits_from(model: nn.Module, stream: Stream, start: int) -> list[torch.Tensor]:
    """Logits per batch from layer ``start`` on (for small vocabularies; prefer ``nll_from`` for losses)."""
    head = adapter_for(model).lm_head(model)
    return [head(h) for h in run_from(model, stream, start)]


@torch.no_grad()
def nll_from(model: nn.Module, stream: Stream, start: int) -> NLL:
    """Next-token NLL of the stream's token ids, running the model from layer ``start`` on the stream."""
    head = adapter_for(model).lm_head(model)
    total = NLL()
    for normed, ids in zip(run_from(model, stream, start), stream.ids, strict=True):
        total = total + head_nll(head, normed, ids)
    return total


@torch.no_grad()
def all_layer_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int | None = None) -> list[Stream]:
    """Streams holding the inputs of every decoder layer (index i = layer i), from one walk."""
    stream = capture(model, ids, 0, batch_size)
    out = []
    for _i, _layer in walk(model, stream):
        out.append(stream.copy())
    return out
