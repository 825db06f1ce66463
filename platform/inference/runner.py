"""Runners: what executes the model over a step. :class:`LocalRunner` is one process; the actor
graph's runner (``raymoe.actors.inference.GraphRunner``) has the same two methods.

``main(batch, logit_rows, hidden_rows)`` runs the main model over the step's rows and returns
the float32 logits of ``logit_rows`` and the final-normed hidden states of ``hidden_rows``;
``mtp(batch, hidden, logit_rows)`` runs the first MTP module over rows whose input tokens are the
*next* tokens (t_{i+1} at position i) and whose ``hidden`` [N, D] are the main model's, and
returns the logits of ``logit_rows`` (the drafts of the next step).
"""

from __future__ import annotations

import torch

from raymoe.platform.config import ModelConfig
from raymoe.platform.inference.batch import StepBatch
from raymoe.platform.inference.cache import BlockCache
from raymoe.platform.inference.forward import ExpertCall, drive, mtp_program, rope, run_blocks
from raymoe.platform.model.transformer import DeepseekV3


def cache_blocks(cache_tokens: int, block_size: int) -> int:
    """Blocks of a cache of ``cache_tokens`` tokens, plus the padding block."""
    return -(-cache_tokens // block_size) + 1


class LocalRunner:
    """The whole model in this process, with the block cache of every layer and MTP module.

    Args:
        model: the model, already in its inference dtype (``prepare_for_inference``).
        num_blocks, block_size: the cache pool.
        cache_dtype: default the model's dtype.
    """

    def __init__(self, model: DeepseekV3, num_blocks: int, block_size: int, cache_dtype: torch.dtype | None = None):
        self.model = model.eval()
        self.cfg: ModelConfig = model.cfg
        for moe in model.moe_layers():
            moe.count_loads = False
        self.block_size, self.num_blocks = block_size, num_blocks
        param = model.lm_head.weight
        self.cache = BlockCache(
            list(range(model.num_cache_layers)),
            num_blocks,
            block_size,
            self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim,
            cache_dtype or param.dtype,
            param.device,
        )
        blocks = list(model.model.layers) + list(model.model.mtp)
        self._experts = {b.self_attn.layer_id: b.mlp.experts for b in blocks if hasattr(b.mlp, "experts")}

    def _on_device(self, batch: StepBatch, *tensors: torch.Tensor | None) -> tuple:
        """The step's index tensors on the model's device (the engine builds them on the CPU)."""
        device = self.model.lm_head.weight.device
        if device.type == "cpu":
            return (batch, *tensors)
        return (batch.to(device), *(t.to(device) if t is not None else None for t in tensors))

    @property
    def has_mtp(self) -> bool:
        return len(self.model.model.mtp) > 0

    def _experts_call(self, call: ExpertCall) -> torch.Tensor:
        return self._experts[call.layer](call.x, call.idx, call.weights)

    @torch.inference_mode()
    def main(
        self, batch: StepBatch, logit_rows: torch.Tensor, hidden_rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.model.model
        batch, logit_rows, hidden_rows = self._on_device(batch, logit_rows, hidden_rows)
        h = m.embed_tokens(batch.tokens)
        cos, sin = rope(m.rotary_emb, batch, h.dtype)
        h = drive(run_blocks(list(m.layers), h, batch, self.cache, cos, sin), self._experts_call)
        h = m.norm(h)
        logits = self.model.lm_head(h.index_select(0, logit_rows)).float()
        return logits, (h.index_select(0, hidden_rows) if hidden_rows is not None else None)

    @torch.inference_mode()
    def mtp(self, batch: StepBatch, hidden: torch.Tensor, logit_rows: torch.Tensor) -> torch.Tensor:
        m = self.model.model
        batch, logit_rows, hidden = self._on_device(batch, logit_rows, hidden)
        module = m.mtp[0]
        program = mtp_program(module, hidden, m.embed_tokens(batch.tokens), batch, self.cache, m.rotary_emb)
        h = drive(program, self._experts_call)
        return self.model.lm_head(module.shared_head.norm(h.index_select(0, logit_rows))).float()

    def close(self) -> None:
        pass
