"""``pretrain`` on the actor graph: resume, what MLflow receives, and the exported checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from raymoe.actors.trainers import build_trainer
from raymoe.platform.checkpoint.reader import load_model
from raymoe.platform.config import load_config
from raymoe.platform.train.loop import pretrain


def _cfg(tmp_path: Path, steps: int, *extra: str):
    return load_config(
        "tiny",
        [f"train.steps={steps}", "train.checkpoint_every=3", "parallel.micro_batches=2",
         f"tracking.uri=sqlite:///{tmp_path}/mlruns.db", *extra],
    )  # fmt: skip


def test_graph_run_resumes_exactly_and_is_tracked(tiny_data: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path, 6, "parallel.pp=2", "parallel.ep=2")
    full = pretrain(cfg, tiny_data, tmp_path / "full", progress=False, trainer=build_trainer(cfg, "graph"))
    # a run that stops after 3 steps, resumed by a graph of another layout
    cut = _cfg(tmp_path, 6, "parallel.pp=2", "parallel.ep=2", "train.steps=3")
    pretrain(cut, tiny_data, tmp_path / "cut", progress=False, trainer=lambda: build_trainer(cut, "graph"))
    other = _cfg(tmp_path, 6, "parallel.ep=3")
    resumed = pretrain(other, tiny_data, tmp_path / "cut", resume=True, progress=False,
                       trainer=lambda: build_trainer(other, "graph"))  # fmt: skip
    assert len(resumed.losses) == 3
    for got, want in zip(resumed.losses, full.losses[3:]):
        assert abs(got - want) <= 1e-5 * want
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(full.run_id)
    assert run.data.params["trainer"] == "graph"
    params = run.data.params
    assert (params["graph.pp"], params["graph.ep"], params["graph.actors"]) == ("2", "2", "4")
    metrics = run.data.metrics
    for key in ("compute_s/stage_r0_s0", "compute_s/stage_r0_s1", "wait_s/shard_1", "tokens/shard_0",
                "tokens/shard_1", "graph/step_s", "loss", "val/loss"):  # fmt: skip
        assert key in metrics, key
    # each of the tiny preset's 3 MoE layers (2 main + MTP) routes 4 × 32 tokens × top-2 per step
    assert metrics["tokens/shard_0"] + metrics["tokens/shard_1"] == 3 * 4 * 32 * 2
    assert str(full.checkpoint).endswith("step_00000006")


def test_exported_checkpoint_loads_in_transformers_and_generate(tiny_data: Path, tmp_path: Path) -> None:
    from transformers import DeepseekV3ForCausalLM

    cfg = _cfg(tmp_path, 3, "parallel.ep=2")
    result = pretrain(cfg, tiny_data, tmp_path / "run", progress=False, trainer=lambda: build_trainer(cfg, "graph"))
    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "raymoe.pipelines.cli", "export", "--checkpoint", str(tmp_path / "run"),
           "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    ours = load_model(str(result.checkpoint))
    theirs = DeepseekV3ForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4
    gen = [sys.executable, "-m", "raymoe.pipelines.cli", "generate", "--checkpoint", str(out), "--prompt-ids", "1,2,3",
           "--max-new-tokens", "4", "--json"]  # fmt: skip
    done = subprocess.run(gen, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    bad = subprocess.run([*cmd[:4], "--checkpoint", str(tmp_path / "nothing"), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "does not exist" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
