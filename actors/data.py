"""Data preparation spread over a Ray cluster: the corpus's units tokenized in parallel with Ray Data.

:func:`ray_data_map` is a :data:`~raymoe.platform.data.prepare.UnitMap` for
:func:`~raymoe.platform.data.prepare.prepare_dataset`: it uses the running Ray, else joins
``RAY_ADDRESS``'s cluster, else starts a local Ray of ``num_cpus`` and shuts it down afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray; else join ``RAY_ADDRESS`` or start a local Ray, and shut it down afterwards."""
    import ray

    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], configure_logging=False)
    else:
        ray.init(
            address="local",  # a Ray of its own for this map, even where another runs on this machine
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    try:
        yield
    finally:
        ray.shutdown()


def ray_data_map(num_cpus: int | None = None) -> Callable[..., Iterator[pa.Table]]:
    """A unit map that runs every unit as a Ray Data task (one unit per block), results in any order."""

    def run(items: list[dict[str, Any]], fn: Callable[..., pa.Table], fn_kwargs: dict[str, Any]) -> Iterator[pa.Table]:
        with ray_session(num_cpus):
            import ray.data

            ctx = ray.data.DataContext.get_current()
            saved_bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # the caller shows its own bar
            try:
                ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                    fn, batch_size=1, batch_format="pyarrow", fn_kwargs=fn_kwargs
                )
                yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
            finally:
                ctx.enable_progress_bars = saved_bars

    return run
