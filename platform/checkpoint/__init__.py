"""Checkpoints: the names (``layout``), training checkpoints (``sharded``), Hugging Face import (``hf``) and
export (``hf_save``), any of them read by tensor name (``reader``), and FP8 block-wise (de)quantization."""

from raymoe.platform.checkpoint.fp8 import (
    FP8_BLOCK,
    FP8_E4M3_MAX,
    dequantize_fp8_activation,
    dequantize_fp8_blockwise,
    quantize_fp8_activation,
    quantize_fp8_blockwise,
)
from raymoe.platform.checkpoint.hf import HFCheckpoint, checkpoint_name, read_headers
from raymoe.platform.checkpoint.hf_save import export_hf, save_hf_checkpoint
from raymoe.platform.checkpoint.layout import CheckpointError, latest_checkpoint, resolve
from raymoe.platform.checkpoint.reader import load_into, load_model, open_checkpoint
from raymoe.platform.checkpoint.sharded import TrainingCheckpoint

__all__ = [
    "FP8_BLOCK", "FP8_E4M3_MAX", "CheckpointError", "HFCheckpoint", "TrainingCheckpoint", "checkpoint_name",
    "dequantize_fp8_activation", "dequantize_fp8_blockwise", "export_hf", "latest_checkpoint", "load_into",
    "load_model", "open_checkpoint", "quantize_fp8_activation", "quantize_fp8_blockwise", "read_headers", "resolve",
    "save_hf_checkpoint",
]  # fmt: skip
