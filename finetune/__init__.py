"""QLoRA fine-tuning of dense or LoRD-factored models: frozen NF4 base + LoRA (peft), a training loop with
accumulation / schedule / eval / early stop, adapter save, and a merged float model for evaluation.

    from finetune import FinetuneConfig, finetune_to_dir
    metrics = finetune_to_dir("smollm2-135m", FinetuneConfig(steps=50, lora_r=16), Path("runs/ft"))
"""

from .blockwise import BlockwiseConfig, blockwise_to_dir
from .checkpoint import load_finetuned
from .cli import run_finetune
from .config import DEFAULT_TARGETS, FinetuneConfig
from .data import load_instructions, validate_jsonl
from .errors import FinetuneError
from .isolated import finetune_in_subprocess
from .qlora import attach_lora, load_base, target_module_names
from .stage import finetune_to_dir
from .train import TrainResult, train

__all__ = [
    "DEFAULT_TARGETS", "BlockwiseConfig", "FinetuneConfig", "FinetuneError", "TrainResult", "attach_lora",
    "blockwise_to_dir", "finetune_in_subprocess", "finetune_to_dir", "load_base", "load_finetuned", "load_instructions", "run_finetune", "target_module_names",
    "train", "validate_jsonl",
]
