"""The single-device DeepSeek-V3 model (no Ray here)."""

from raymoe.platform.model.attention import MLA, LatentCache
from raymoe.platform.model.layers import MLP, RMSNorm
from raymoe.platform.model.moe import Experts, Gate, MoE, route, sequence_balance_loss
from raymoe.platform.model.transformer import IGNORE_INDEX, Block, DeepseekV3, LossOutput, MTPModule

__all__ = [
    "IGNORE_INDEX", "MLA", "MLP", "Block", "DeepseekV3", "Experts", "Gate", "LatentCache", "LossOutput",
    "MTPModule", "MoE", "RMSNorm", "route", "sequence_balance_loss",
]  # fmt: skip
