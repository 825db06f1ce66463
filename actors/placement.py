"""Where the model's pieces live in the actor graph: layers on stages, (layer, expert) on shards.

A :class:`Placement` is data: the driver builds the actors from it, a checkpoint records it, and a
new one can be computed when a shard is lost or added (experts then move with their optimizer
state). Splits may be uneven: 32 experts on 3 shards are 11 + 11 + 10.

Experts of one layer go to shards in contiguous blocks, so the experts of a routing group
(``n_group`` groups of consecutive experts) sit together and group-limited routing sends each
token to few shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.platform.config import ConfigError, ModelConfig, ParallelConfig


def split_evenly(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous blocks of ``n`` items, the first ``n % parts`` one larger."""
    if parts <= 0:
        raise ValueError(f"cannot split into {parts} parts")
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class Placement:
    """Layers → stages and (MoE layer, expert) → expert shards.

    Args:
        num_layers: main decoder layers; the MTP modules (layers ``num_layers + k``) always sit
            on the last stage, with the final norm and the output head.
        stage_bounds: per stage, its [start, end) range of main layers.
        moe_layers: indices of the MoE layers (main layers, then MTP modules).
        expert_shards: per MoE layer (in ``moe_layers`` order), the shard of each expert.
        ep: number of expert shards.
    """

    num_layers: int
    stage_bounds: tuple[tuple[int, int], ...]
    moe_layers: tuple[int, ...]
    expert_shards: tuple[tuple[int, ...], ...]
    ep: int

    @property
    def pp(self) -> int:
        return len(self.stage_bounds)

    def stage_of(self, layer: int) -> int:
        """The stage that owns ``layer`` (an MTP layer belongs to the last stage)."""
        if layer >= self.num_layers:
            return self.pp - 1
        for stage, (start, end) in enumerate(self.stage_bounds):
            if start <= layer < end:
                return stage
        raise ValueError(f"layer {layer} is not in the placement ({self.num_layers} layers)")

    def shard_of(self, layer: int, expert: int) -> int:
        """The expert shard that holds ``expert`` of MoE layer ``layer``."""
        return self.expert_shards[self.moe_layers.index(layer)][expert]

    def experts_on(self, shard: int, layer: int) -> list[int]:
        """The experts of MoE layer ``layer`` that shard ``shard`` holds, ascending."""
        return [e for e, s in enumerate(self.expert_shards[self.moe_layers.index(layer)]) if s == shard]

    def routing(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(shard of each expert [E], its index among that shard's experts [E]) of MoE layer ``layer``."""
        shards = torch.tensor(self.expert_shards[self.moe_layers.index(layer)])
        local = torch.zeros_like(shards)
        for k in range(self.ep):
            here = (shards == k).nonzero().squeeze(1)
            local[here] = torch.arange(here.numel())
        return shards, local

    def to_dict(self) -> dict:
        """JSON-serializable form (checkpoints record it)."""
        return {
            "num_layers": self.num_layers,
            "stage_bounds": [list(b) for b in self.stage_bounds],
            "moe_layers": list(self.moe_layers),
            "expert_shards": [list(s) for s in self.expert_shards],
            "ep": self.ep,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Placement:
        return cls(
            num_layers=d["num_layers"],
            stage_bounds=tuple(tuple(b) for b in d["stage_bounds"]),
            moe_layers=tuple(d["moe_layers"]),
            expert_shards=tuple(tuple(s) for s in d["expert_shards"]),
            ep=d["ep"],
        )


def build_placement(model: ModelConfig, parallel: ParallelConfig) -> Placement:
    """Contiguous, as-even-as-possible stages of layers and blocks of experts per shard."""
    if parallel.pp > model.num_hidden_layers:
        raise ConfigError(
            f"parallel.pp ({parallel.pp}) is more than model.num_hidden_layers ({model.num_hidden_layers})"
        )
    if parallel.ep > model.n_routed_experts:
        raise ConfigError(f"parallel.ep ({parallel.ep}) is more than model.n_routed_experts ({model.n_routed_experts})")
    bounds, start = [], 0
    for size in split_evenly(model.num_hidden_layers, parallel.pp):
        bounds.append((start, start + size))
        start += size
    moe_layers = tuple(range(model.first_k_dense_replace, model.num_hidden_layers)) + tuple(
        model.num_hidden_layers + k for k in range(model.num_nextn_predict_layers)
    )
    blocks = [
        shard for shard, size in enumerate(split_evenly(model.n_routed_experts, parallel.ep)) for _ in range(size)
    ]
    return Placement(
        num_layers=model.num_hidden_layers,
        stage_bounds=tuple(bounds),
        moe_layers=moe_layers,
        expert_shards=tuple(tuple(blocks) for _ in moe_layers),
        ep=parallel.ep,
    )
