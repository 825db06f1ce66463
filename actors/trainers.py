"""Which trainer runs a pretraining: ``local`` (this process) or ``graph`` (the actor graph, elastic by default)."""

from __future__ import annotations

from typing import Any

from raymoe.platform import storage
from raymoe.platform.config import ConfigError, RaymoeConfig

TRAINERS = ("graph", "local")


def build_trainer(cfg: RaymoeConfig, kind: str, output: str | None = None) -> Any:
    """A trainer of ``cfg``: ``local`` (:class:`~raymoe.platform.train.trainer.LocalTrainer`) or ``graph`` (the Ray
    actor graph of ``cfg.parallel``: :class:`~raymoe.actors.elastic.ElasticGraph`, or a plain
    :class:`~raymoe.actors.driver.GraphTrainer` with ``elastic.enabled=false``). ``output`` is the run's
    output: ``raymoe resize`` requests are read there (when local) and checkpoints go there by default."""
    if kind == "local":
        from raymoe.platform.train.trainer import LocalTrainer

        return LocalTrainer(cfg)
    if kind == "graph":
        if cfg.elastic.enabled:
            from raymoe.actors.elastic import ElasticGraph

            control = output if output is not None and not storage.is_uri(output) else None
            return ElasticGraph(cfg, control_dir=control, checkpoint_root=cfg.train.checkpoint_uri or output)
        from raymoe.actors.driver import GraphTrainer

        return GraphTrainer(cfg)
    raise ConfigError(f"the trainer must be one of {', '.join(TRAINERS)}, got {kind!r}")
