"""Which trainer runs a pretraining: ``local`` (this process), ``graph`` (the actor graph, elastic by default) or
``train`` (data parallelism on Ray Train, :mod:`raymoe.actors.ray_train`)."""

from __future__ import annotations

from typing import Any

from raymoe.platform import storage
from raymoe.platform.config import ConfigError, RaymoeConfig

TRAINERS = ("graph", "local", "train")
TRAINER_HELP = {
    "graph": "the Ray actor graph of parallel.dp/pp/ep: the model cut into stages and expert shards, for what does "
    "not fit one device (default; a local Ray is started unless RAY_ADDRESS is set)",
    "local": "this process only",
    "train": "data parallelism on Ray Train: parallel.dp workers, each with the whole model, gradients all-reduced "
    "(gloo or NCCL), restarts through Ray Train; the first choice for a model that fits one device",
}


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
    if kind == "train":
        raise ConfigError(
            "--trainer train runs the whole training loop in its Ray Train workers, not as a trainer of this "
            "process: call raymoe.actors.ray_train.train_with_ray_train"
        )
    raise ConfigError(f"the trainer must be one of {', '.join(TRAINERS)}, got {kind!r}")
