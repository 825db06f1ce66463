"""Checkpoint formats: the Hugging Face / DeepSeek-V3 adapter and FP8 block-wise (de)quantization."""

from raymoe.platform.checkpoint.fp8 import (
    FP8_BLOCK,
    FP8_E4M3_MAX,
    dequantize_fp8_activation,
    dequantize_fp8_blockwise,
    quantize_fp8_activation,
    quantize_fp8_blockwise,
)
from raymoe.platform.checkpoint.hf import (
    CheckpointError,
    TensorInfo,
    checkpoint_name,
    load_hf_checkpoint,
    load_hf_checkpoint_into,
    load_state_dict_from_hf,
    read_headers,
)
from raymoe.platform.checkpoint.hf_save import save_hf_checkpoint

__all__ = [
    "FP8_BLOCK", "FP8_E4M3_MAX", "CheckpointError", "TensorInfo", "checkpoint_name", "dequantize_fp8_activation",
    "dequantize_fp8_blockwise", "load_hf_checkpoint", "load_hf_checkpoint_into", "load_state_dict_from_hf",
    "quantize_fp8_activation", "quantize_fp8_blockwise", "read_headers", "save_hf_checkpoint",
]  # fmt: skip
