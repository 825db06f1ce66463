"""``raymoe resize``: ask a running graph pretraining to change its layout at its next step boundary.

raymoe resize --output outputs/run1 ep=3          # three expert shards (within parallel.ep, elastic.min_ep)
raymoe resize --output outputs/run1 dp=1 ep=2

The driver of the run writing into ``--output`` reads the request between two steps, writes a
checkpoint, rebuilds the graph at the new layout and restores it there (no step lost). A layout
outside [elastic.min_*, parallel.*], or one whose replicas cannot share the global batch's
micro-batches, is refused in the driver's log. The graph also grows back by itself when
resources return (``elastic.grow``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resize", help="ask a running graph pretraining to change dp/ep", description=__doc__)
    p.add_argument("--output", required=True, help="the run's output directory (its --output)")
    p.add_argument("sizes", nargs="+", metavar="dp=N|ep=N", help="the new number of replicas and/or shards")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from raymoe.actors.elastic import request_resize

    sizes: dict[str, int] = {}
    for item in args.sizes:
        key, _, value = item.partition("=")
        if key not in ("dp", "ep") or not value.isdigit() or int(value) < 1:
            print(f"raymoe resize: {item!r} is not dp=N or ep=N with N >= 1", file=sys.stderr)
            return 2
        sizes[key] = int(value)
    if not Path(args.output).is_dir():
        print(f"raymoe resize: {args.output} is not a directory (the run's --output)", file=sys.stderr)
        return 2
    path = request_resize(args.output, **sizes)
    print(f"requested {sizes} in {path}; the driver applies it at its next step boundary")
    return 0
