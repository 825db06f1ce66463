"""The actor graph as a :class:`~raymoe.platform.analysis.experts.RoutingSource`: routing analysis on Ray actors.

The graph is the training graph (:class:`~raymoe.actors.driver.GraphTrainer`) started from the
checkpoint's weights (``train.init_from``), used for forwards only: every attention stage records
the routing of its own layers where its gates run and returns it with the evaluation's results,
the losses are its evaluation's, and the masking ablation's biases reach the gates as an optimizer
step's would. Each actor loads its own share of the checkpoint; the driver holds no weights.
"""

from __future__ import annotations

import dataclasses

import torch

from raymoe.actors.driver import GraphTrainer
from raymoe.platform.analysis.capture import RoutingRecord
from raymoe.platform.config import ParallelConfig, RaymoeConfig, TrainConfig


class GraphSource:
    """Routing, losses and gate biases of a model on the actor graph.

    Args:
        trainer: the graph (built with the model's weights: ``train.init_from`` or initialized).
    """

    def __init__(self, trainer: GraphTrainer) -> None:
        self.trainer = trainer

    @classmethod
    def from_checkpoint(
        cls,
        location: str,
        model_config: object,
        parallel: ParallelConfig,
        dtype: str = "fp32",
        in_process: bool = False,
    ) -> GraphSource:
        """The graph of ``parallel``'s layout (dp, pp, ep, device, resources) with the weights of ``location``,
        computing in ``dtype`` (``fp32`` or ``bf16`` autocast)."""
        cfg = dataclasses.replace(RaymoeConfig(), model=model_config, parallel=parallel,
                                  train=TrainConfig(init_from=str(location), dtype=dtype))  # fmt: skip
        return cls(GraphTrainer(cfg, in_process=in_process))

    def record(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[RoutingRecord]:
        return self.trainer.record(batches)

    def loss(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        return self.trainer.evaluate(batches)[0]

    def biases(self) -> dict[int, torch.Tensor]:
        layers = self.trainer.placement.moe_layers
        return {layer: self.trainer.biases[i].clone() for i, layer in enumerate(layers)}

    def set_biases(self, biases: dict[int, torch.Tensor]) -> None:
        self.trainer.set_biases(biases)

    def close(self) -> None:
        self.trainer.shutdown()
