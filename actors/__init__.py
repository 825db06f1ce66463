"""The actor graph: the runtime, one stage actor and one shard actor (training or serving), the placement,
the training driver and its elastic wrapper, the serving runner, and the trainer factory."""
