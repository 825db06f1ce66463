"""Runners: what executes the model over an engine step. :class:`LocalRunner` is one process; the actor
graph's runner (``raymoe.actors.graph.GraphRunner``) has the same methods.

``main(batch, logit_rows, hidden_rows)`` runs the main model over the step's rows and returns
the float32 logits of ``logit_rows`` and the final-normed hidden states of ``hidden_rows``;
``mtp(batch, hidden, logit_rows)`` runs the first MTP module over rows whose input tokens are the
*next* tokens (t_{i+1} at position i) and whose ``hidden`` [N, D] are the main model's, and
returns the logits of ``logit_rows`` (the drafts of the next step). Both run the model's one
forward (:mod:`raymoe.platform.model.forward`) over the paged latent cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from raymoe.platform.config import ModelConfig
from raymoe.platform.inference.batch import StepBatch
from raymoe.platform.inference.cache import BlockCache
from raymoe.platform.model.attention import naive_min_run
from raymoe.platform.model.forward import ExpertCall, drive, head, local_experts, main_program, mtp_program
from raymoe.platform.model.transformer import DeepseekV3


def cache_blocks(cache_tokens: int, block_size: int) -> int:
    """Blocks of a cache of ``cache_tokens`` tokens, plus the padding block."""
    return -(-cache_tokens // block_size) + 1


class LocalRunner:
    """The whole model in this process, with the block cache of every layer and MTP module.

    Args:
        model: the model, already in its inference dtype (``prepare_for_inference``) and on its device.
        num_blocks, block_size: the cache pool.
        cache_dtype: default the model's dtype.
        experts: what answers the forward's expert calls (default the model's own routed experts; a
            :class:`~raymoe.platform.inference.expert_store.TieredExperts` under an expert budget).
        count: count the tokens routed to each expert (``stats()["expert_loads"]``, ``/stats``).
    """

    def __init__(
        self,
        model: DeepseekV3,
        num_blocks: int,
        block_size: int,
        cache_dtype: torch.dtype | None = None,
        experts: Callable[[ExpertCall], torch.Tensor] | None = None,
        count: bool = True,
    ) -> None:
        self.model = model.eval()
        self.cfg: ModelConfig = model.cfg
        self.block_size, self.num_blocks = block_size, num_blocks
        self.device = model.device
        self.cache = BlockCache(
            list(range(model.num_cache_layers)),
            num_blocks,
            block_size,
            self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim,
            cache_dtype or model.dtype,
            self.device,
        )
        self.naive_min_run = naive_min_run(self.cfg)
        self.tiered = experts  # e.g. raymoe.platform.inference.expert_store.TieredExperts; None: the model's own
        answer = experts or local_experts(model)
        self.counts = LiveCounts(model, answer) if count else None  # off where the forward is compiled
        self._experts = self.counts or answer

    @property
    def has_mtp(self) -> bool:
        return len(self.model.mtp_modules()) > 0

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _on_device(self, batch: StepBatch, *tensors: torch.Tensor | None) -> tuple:
        """The step's index tensors on the model's device (the engine builds them on the CPU)."""
        if self.device.type == "cpu":
            return (batch, *tensors)
        return (batch.to(self.device), *(t.to(self.device) if t is not None else None for t in tensors))

    @torch.inference_mode()
    def main(
        self, batch: StepBatch, logit_rows: torch.Tensor, hidden_rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, logit_rows, hidden_rows = self._on_device(batch, logit_rows, hidden_rows)
        ctx = batch.attention(self.cache.flat, self.cache.layer_base)
        h = drive(main_program(self.model, ctx, tokens=batch.tokens), self._experts)
        logits = head(self.model, h.index_select(0, logit_rows))
        return logits, (h.index_select(0, hidden_rows) if hidden_rows is not None else None)

    @torch.inference_mode()
    def mtp(self, batch: StepBatch, hidden: torch.Tensor, logit_rows: torch.Tensor) -> torch.Tensor:
        batch, logit_rows, hidden = self._on_device(batch, logit_rows, hidden)
        ctx = batch.attention(self.cache.flat, self.cache.layer_base)
        module = self.model.mtp_modules()[0]
        emb = self.model.model.embed_tokens(batch.tokens)
        h = drive(mtp_program(module, self.model, hidden, emb, ctx), self._experts)
        return head(self.model, h.index_select(0, logit_rows), module.shared_head.norm)

    def stats(self) -> dict:
        out = {"runner": "local", "param_bytes": self.param_bytes, "cache_bytes": self.cache.bytes,
               "expert_loads": self.counts.to_dict() if self.counts is not None else None}  # fmt: skip
        if self.tiered is not None:
            out |= self.tiered.stats()
        return out

    def close(self) -> None:
        if self.tiered is not None:
            self.tiered.close()


class LiveCounts:
    """Answers expert calls with ``experts`` and counts the tokens routed to each expert, per MoE layer.

    ``loads`` [layers, E] float64 in the model's ``moe_by_layer`` order (main layers, then MTP modules):
    what ``/stats`` reports as ``expert_loads``, and what :mod:`raymoe.platform.analysis.loads` calls
    the ``serving`` source."""

    def __init__(self, model: DeepseekV3, experts: Callable[[ExpertCall], torch.Tensor] | None = None) -> None:
        self.experts = experts  # None: count only (a graph stage, whose shards answer)
        self.layers = list(model.moe_by_layer())
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        self.loads = torch.zeros(len(self.layers), model.cfg.n_routed_experts, dtype=torch.float64)
        self.tokens = torch.zeros(len(self.layers), dtype=torch.long)

    def count(self, call: ExpertCall) -> None:
        i = self.index[call.layer]
        self.loads[i] += torch.bincount(call.idx.reshape(-1), minlength=self.loads.shape[1]).to("cpu", torch.float64)
        self.tokens[i] += call.idx.shape[0]

    def __call__(self, call: ExpertCall) -> torch.Tensor:
        self.count(call)
        return self.experts(call)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "tokens": self.tokens.tolist(), "loads": self.loads.tolist()}
