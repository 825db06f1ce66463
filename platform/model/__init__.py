"""The single-device DeepSeek-V3 model (no Ray here); its one forward is :mod:`raymoe.platform.model.forward`."""

from raymoe.platform.model.attention import MLA, CausalAttention, PagedAttention
from raymoe.platform.model.forward import IGNORE_INDEX, ExpertCall, Hooks, LossOutput, drive, local_experts
from raymoe.platform.model.layers import MLP, RMSNorm
from raymoe.platform.model.moe import Experts, Gate, MoE, route, sequence_balance_loss
from raymoe.platform.model.transformer import Block, DeepseekV3, MTPModule

__all__ = [
    "IGNORE_INDEX", "MLA", "MLP", "Block", "CausalAttention", "DeepseekV3", "ExpertCall", "Experts", "Gate", "Hooks",
    "LossOutput", "MTPModule", "MoE", "PagedAttention", "RMSNorm", "drive", "local_experts", "route",
    "sequence_balance_loss",
]  # fmt: skip
