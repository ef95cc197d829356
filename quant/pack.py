"""Bit packing in the GPTQ v1 checkpoint layout (AutoGPTQ ``QuantLinear.pack``).

Values are written as one little-endian bit stream into int32 words: for 2/4/8 bits that is
``32 / bits`` whole values per word; for 3 bits the stream crosses word boundaries exactly as AutoGPTQ's
3-bit packer does (32 values -> 3 words). ``qweight`` packs along the input dim ``[in, out] -> [in*bits/32,
out]``; ``qzeros`` packs along the output dim ``[groups, out] -> [groups, out*bits/32]`` and stores
``zero - 1`` (the v1 convention that loaders undo). A dimension that does not fill whole words is
zero-padded (LoRD factors of odd rank). For 2/4/8 bits GPTQModel sizes its buffers with the same ceiling, so
it reads them (quant/gptqmodel_lord.py); for 3 bits it expects ceil(n*3/32) words, not whole 3-word units, so a
3-bit factor whose rank is not a multiple of 32 loads only in ours.
"""

from __future__ import annotations

import torch

_FAST = (2, 4, 8)


def _unit(bits: int) -> int:
    """Values per packing unit: one word for 2/4/8 bits, three words (32 values) for 3 bits."""
    return 32 // bits if bits in _FAST else 32


def packed_len(n: int, bits: int) -> int:
    u = _unit(bits)
    return (n + u - 1) // u * (1 if bits in _FAST else bits)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int tensor [n, m] with entries in [0, 2^bits) -> int32 [packed_len(n, bits), m]."""
    n, m = values.shape
    v = values.to(torch.int64)
    v = torch.nn.functional.pad(v, (0, 0, 0, (-n) % _unit(bits)))
    if bits in _FAST:
        per = 32 // bits
        shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
        words = (v.view(-1, per, m) << shifts).sum(dim=1)
    else:
        bit = (v.unsqueeze(1) >> torch.arange(bits).view(1, bits, 1)) & 1  # [N, bits, m], LSB first
        words = (bit.reshape(-1, 32, m) << torch.arange(32).view(1, 32, 1)).sum(dim=1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: int32 [packed_len(n, bits), m] -> int32 [n, m]."""
    m = packed.shape[1]
    w = packed.to(torch.int64) & 0xFFFFFFFF
    mask = 2**bits - 1
    if bits in _FAST:
        per = 32 // bits
        shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
        vals = ((w.unsqueeze(1) >> shifts) & mask).reshape(-1, m)
    else:
        bit = (w.unsqueeze(1) >> torch.arange(32).view(1, 32, 1)) & 1  # [words, 32, m]
        bit = bit.reshape(-1, bits, m)  # one value's bits, LSB first
        vals = (bit << torch.arange(bits).view(1, bits, 1)).sum(dim=1)
    return vals[:n].to(torch.int32)


def pack_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Levels ``q`` [out, in] -> ``qweight`` int32 [in*bits/32, out]."""
    return pack_rows(q.T, bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """``qweight`` -> levels [in, out] (transposed, the layout the dequantizer consumes)."""
    return unpack_rows(qweight, bits, in_features)


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points [groups, out] -> ``qzeros`` int32 [groups, out*bits/32], storing ``zero - 1`` (v1)."""
    stored = (zeros.to(torch.int64) - 1) & (2**bits - 1)
    return pack_rows(stored.T, bits).T.contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """``qzeros`` -> zero points [groups, out] (adds back the v1 offset of 1)."""
    return unpack_rows(qzeros.T.contiguous(), bits, out_features).T + 1
