"""``raymoe bench recovery``: how long the elastic graph takes to recover from a killed actor.

Trains a preset on the actor graph (default ``small`` at dp=1, pp=2, ep=2 on a local Ray),
SIGKILLs one actor's process (by the id Ray reports) right after a given step, and reports the
seconds from the failure's detection to the next completed step (``elastic/recovery_s``: rebuild
the graph, restore the latest checkpoint, run the step), plus the steps that had to be done again.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from raymoe.platform.config import load_config


def run(preset: str = "small", overrides: list[str] | None = None, kill_after: int = 12,
        victim: str = "Shard(1)", data: str | None = None) -> dict[str, Any]:  # fmt: skip
    from raymoe.actors.elastic import ElasticGraph
    from raymoe.pipelines.pretrain import default_data_dir, ensure_default_data
    from raymoe.platform.train.loop import pretrain

    cfg = load_config(preset, ["train.steps=20", "train.checkpoint_every=5", "train.eval_every=0", "parallel.pp=2",
                               "parallel.ep=2", "tracking.enabled=false", *(overrides or [])])  # fmt: skip
    data_dir = Path(data) if data else ensure_default_data(default_data_dir(cfg), cfg, progress=False)
    killed: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as out:
        trainer = ElasticGraph(cfg, control_dir=out, checkpoint_root=out)

        def kill(m) -> None:  # noqa: ANN001
            if m.step == kill_after and not killed:
                killed["at"] = time.perf_counter()
                os.kill(trainer.pids[victim], signal.SIGKILL)

        try:
            t0 = time.perf_counter()
            result = pretrain(cfg, data_dir, out, progress=False, trainer=trainer, on_step=kill)
            total = time.perf_counter() - t0
        finally:
            trainer.close()
    ckpt_every = cfg.train.checkpoint_every
    return {
        "preset": preset,
        "layout": {"dp": cfg.parallel.dp, "pp": cfg.parallel.pp, "ep": cfg.parallel.ep},
        "victim": victim,
        "killed_after_step": kill_after,
        "steps_redone": (kill_after + 1) % ckpt_every if ckpt_every else kill_after + 1,
        "failures": result.failures,
        "recovery_s": result.recovery_s,
        "step_s": 1 / max(result.tokens_per_s, 1e-9) * cfg.train.batch_size * cfg.train.seq_len,
        "run_s": total,
    }


def main(args: Any) -> int:
    report = run(args.preset, args.overrides, args.kill_after, args.victim, args.data)
    rec = ", ".join(f"{s:.1f}" for s in report["recovery_s"]) or "-"
    print(f"raymoe bench recovery: {report['preset']} at dp={report['layout']['dp']} pp={report['layout']['pp']} "
          f"ep={report['layout']['ep']}; SIGKILL {report['victim']} after step {report['killed_after_step']}\n"
          f"  recovery (detection -> next completed step): {rec} s; steps done again: {report['steps_redone']}; "
          f"a step takes {report['step_s']:.2f} s; the whole run {report['run_s']:.0f} s")  # fmt: skip
    if args.json:
        print(json.dumps(report))
    return 0 if report["failures"] == 1 else 1
