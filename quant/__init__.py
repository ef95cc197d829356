"""GPTQ / RTN quantization with SpQR-style outliers, GPTQ v1 packing, QuantLinear and checkpoint export.

A plain library (no Prefect, no MLflow): ``quantize_model`` works in memory, ``quantize_to_dir`` is the
pipeline stage, ``load_quantized`` the loader ``sources.load_model`` calls for ``kind: gptq`` artifacts.
"""

from quant.checkpoint import load_quantized, save_quantized
from quant.config import QuantConfig
from quant.errors import QuantError
from quant.gptq import GPTQ
from quant.qlinear import QuantLinear
from quant.result import QuantizedWeight
from quant.rtn import rtn_quantize
from quant.sequential import QuantReport, quantize_model
from quant.stage import quantize_to_dir

__all__ = [
    "GPTQ", "QuantConfig", "QuantError", "QuantLinear", "QuantReport", "QuantizedWeight", "load_quantized",
    "quantize_model", "quantize_to_dir", "rtn_quantize", "save_quantized",
]
