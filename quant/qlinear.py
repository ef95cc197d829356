"""QuantLinear: a GPTQ v1 layer (``qweight``, ``qzeros``, ``scales``, ``g_idx``, ``bias``) that runs anywhere.

The forward dequantizes with plain torch ops (so it runs on CPU and CUDA alike) and caches the float weight
on first use: on CPU a matmul against a cached float weight is as fast as the dense model, which is what
perplexity evaluation needs. ``cache=False`` trades that memory for a dequantize per call. Optional SpQR
outliers are two extra buffers (``outlier_idx`` int32 flat indices into ``[out, in]``, ``outlier_val``
float16) that overwrite their entries after dequantization; GPTQ loaders that do not know them ignore them.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.pack import pack_qweight, pack_qzeros, packed_len, unpack_qweight, unpack_qzeros
from quant.result import QuantizedWeight, n_groups


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(x, w)`` multiplies in: autocast's where it is on (a float32 residual stream under bf16
    autocast multiplies in bf16), else ``x``'s. The weight cache holds that dtype, so autocast does not cast a
    float32 copy of every weight at every call."""
    kind = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        n_outliers: int = 0,
        cache: bool = True,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.cache = cache
        groups = n_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(packed_len(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, packed_len(out_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        if n_outliers:
            self.register_buffer("outlier_idx", torch.zeros(n_outliers, dtype=torch.int32))
            self.register_buffer("outlier_val", torch.zeros(n_outliers, dtype=torch.float16))
        else:
            self.outlier_idx = self.outlier_val = None
        self._weight: torch.Tensor | None = None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, cache: bool = True) -> QuantLinear:
        out_f, in_f = qw.shape
        layer = cls(in_f, out_f, qw.bits, qw.group_size, bias is not None, qw.n_outliers, cache)
        layer.qweight.copy_(pack_qweight(qw.q, qw.bits))
        layer.qzeros.copy_(pack_qzeros(qw.zeros, qw.bits))
        layer.scales.copy_(qw.scales)
        layer.g_idx.copy_(qw.g_idx)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        if qw.n_outliers:
            layer.outlier_idx.copy_(qw.outlier_idx)
            layer.outlier_val.copy_(qw.outlier_val)
        return layer

    @property
    def n_outliers(self) -> int:
        return 0 if self.outlier_idx is None else int(self.outlier_idx.numel())

    def dequantize(self) -> torch.Tensor:
        """Float32 weight [out, in]: ``scales[g] * (q - zeros[g])`` per input column, then the outliers."""
        g = self.g_idx.long()
        q = unpack_qweight(self.qweight, self.bits, self.in_features).float()  # [in, out]
        z = unpack_qzeros(self.qzeros, self.bits, self.out_features).float()  # [groups, out]
        w = (self.scales.float()[g] * (q - z[g])).T.contiguous()
        if self.n_outliers:
            w.view(-1)[self.outlier_idx.long()] = self.outlier_val.float()
        return w

    def weight_as(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The float weight in ``dtype`` on ``device``: the cached copy (``cache``), else a fresh dequantize."""
        w = self._weight
        if w is None or w.device != device or w.dtype != dtype:
            w = self.dequantize().to(device=device, dtype=dtype)
            if self.cache:
                self._weight = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_as(matmul_dtype(x), x.device)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, w, bias)

    def _apply(self, fn, recurse=True):  # device/dtype moves invalidate the cached weight
        self._weight = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._weight = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, outliers={self.n_outliers}"
        )
