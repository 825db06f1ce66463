"""Checkpoints and data on S3 (moto's server, see tests/s3_server.py), end to end: pretraining (the local
trainer and the actor graph) writes there and resumes exactly, a crash leaves nothing visible, and export,
generate and the serving graph read from there what they would read from a local copy."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from s3_server import S3Server

from raymoe.pipelines.cli import main
from raymoe.platform import storage
from raymoe.platform.checkpoint import TrainingCheckpoint, latest_checkpoint, load_model, open_checkpoint, resolve
from raymoe.platform.checkpoint.layout import (
    CHECKPOINTS_DIR,
    COLOCATED_FILE,
    CONFIG_FILE,
    SHARDS_FILE,
    STATE_FILE,
    TOKENIZER_FILE,
    experts_file,
    stage_file,
)
from raymoe.platform.checkpoint.sharded import prune_checkpoints
from raymoe.platform.config import config_to_dict, load_config
from raymoe.platform.train.loop import PretrainResult, pretrain
from raymoe.platform.train.trainer import LocalTrainer, StepMetrics

STEPS, CUT = 6, 3  # a run of 6 steps, checkpointed after step 3 and cut short after step 4
GRAPH_REL_TOL = 1e-5  # the actor graph sums the same terms in another order
LOGITS_ATOL = 1e-4  # fp32, same weights, transformers' op order
LOCAL_FILES = [COLOCATED_FILE, CONFIG_FILE, SHARDS_FILE, TOKENIZER_FILE, STATE_FILE]


class Crash(RuntimeError):
    """Stands for a process killed mid-run."""


def _cfg(*extra: str):
    return load_config(
        "tiny",
        [
            f"train.steps={STEPS}",
            f"train.checkpoint_every={CUT}",
            "parallel.micro_batches=2",
            "tracking.enabled=false",
            *extra,
        ],
    )


def _crash_after(step: int, losses: dict[int, float] | None = None) -> Callable[[StepMetrics], None]:
    def on_step(m: StepMetrics) -> None:
        if losses is not None:
            losses[m.step] = m.loss
        if m.step == step:
            raise Crash

    return on_step


def _files(s3_server, uri: str, step: int) -> list[str]:
    """The objects of the checkpoint of ``step`` under ``uri``."""
    prefix = f"{CHECKPOINTS_DIR}/step_{step:08d}/"
    return [k.removeprefix(prefix) for k in s3_server.keys(uri) if k.startswith(prefix)]


def _tensors(location: str) -> dict[str, torch.Tensor]:
    reader = TrainingCheckpoint(location)
    return reader.read(reader.names())


def _copy_dir(src: str, dst: str, names: list[str]) -> None:
    for name in names:
        storage.write_bytes(storage.join(dst, name), storage.read_bytes(storage.join(src, name)))


@pytest.fixture(scope="module")
def s3_data(tiny_data: Path, s3_server: S3Server) -> str:
    """The session's prepared data, on S3 (the same bytes as prepare-data --out s3://… writes)."""
    uri = s3_server.uri(f"{__name__}-{uuid.uuid4().hex[:8]}/data")
    _copy_dir(str(tiny_data), uri, sorted(p.name for p in tiny_data.iterdir()))
    return uri


@pytest.fixture(scope="module")
def unbroken(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> PretrainResult:
    """The reference: the whole run on the local trainer, local data, local output."""
    return pretrain(_cfg(), tiny_data, tmp_path_factory.mktemp("unbroken"), progress=False)


@pytest.fixture(scope="module")
def s3_output(s3_data: str, s3_server: S3Server) -> str:
    """A short ``raymoe pretrain`` with --data and --output on S3; the output's URI."""
    output = s3_server.uri(f"{__name__}-{uuid.uuid4().hex[:8]}/run")
    argv = [
        "pretrain",
        "tiny",
        "--trainer",
        "local",
        "--data",
        s3_data,
        "--output",
        output,
        "--no-progress",
        "train.steps=2",
        "tracking.enabled=false",
        "model.initializer_range=0.1",
    ]
    assert main(argv) == 0
    return output


@pytest.fixture(scope="module")
def local_copy(s3_output: str, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The latest checkpoint of ``s3_output``, copied to a local folder."""
    latest = latest_checkpoint(s3_output)
    out = tmp_path_factory.mktemp("copy") / "ckpt"
    _copy_dir(latest, str(out), s3_server.keys(latest))
    return out


def test_pretrain_checkpoints_to_s3_and_resumes_exactly(
    unbroken: PretrainResult, s3_data: str, s3_prefix: str, s3_server: S3Server, tmp_path: Path
) -> None:
    cfg = _cfg(f"train.checkpoint_uri={s3_prefix}")  # the output stays local; checkpoints go to S3
    output = tmp_path / "run"
    with pytest.raises(Crash):
        pretrain(cfg, s3_data, output, progress=False, on_step=_crash_after(CUT + 1))
    assert s3_server.keys(s3_prefix) == [f"{CHECKPOINTS_DIR}/step_{CUT:08d}/{n}" for n in sorted(LOCAL_FILES)]
    assert not (output / CHECKPOINTS_DIR).exists()
    cut = storage.read_json(storage.join(latest_checkpoint(s3_prefix), STATE_FILE))
    same_step = json.loads(Path(unbroken.output, CHECKPOINTS_DIR, f"step_{CUT:08d}", STATE_FILE).read_text())
    assert (cut["trainer"], cut["step"], cut["loader"], cut["rng"]) == (
        "local",
        CUT,
        same_step["loader"],
        same_step["rng"],
    )

    resumed = pretrain(cfg, s3_data, output, resume=True, progress=False)

    assert resumed.losses == unbroken.losses[CUT:]  # bit-identical: weights, biases, AdamW, data position
    assert resumed.checkpoint == f"{s3_prefix}/{CHECKPOINTS_DIR}/step_{STEPS:08d}"
    a, b = _tensors(unbroken.checkpoint), _tensors(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_actor_graph_checkpoints_to_s3_and_resumes(
    ray_local: object, unbroken: PretrainResult, s3_data: str, s3_prefix: str, s3_server: S3Server
) -> None:
    from raymoe.actors.trainers import build_trainer

    cfg = _cfg("parallel.pp=2", "parallel.ep=2", "elastic.enabled=false")
    first: dict[int, float] = {}
    graph = build_trainer(cfg, "graph", s3_prefix)  # real Ray actors: 2 stages, 2 expert shards
    try:
        with pytest.raises(Crash):
            pretrain(cfg, s3_data, s3_prefix, progress=False, trainer=graph, on_step=_crash_after(CUT + 1, first))
        written = _files(s3_server, s3_prefix, CUT)
        # every actor wrote its own part straight to S3
        parts = [stage_file(0), stage_file(1), experts_file(0), experts_file(1)]
        assert written == sorted([*parts, CONFIG_FILE, SHARDS_FILE, TOKENIZER_FILE, STATE_FILE])
        state = open_checkpoint(s3_prefix).state
        assert (state["trainer"], state["step"], state["parallel"]) == ("graph", CUT, {"dp": 1, "pp": 2, "ep": 2})

        resumed = pretrain(cfg, s3_data, s3_prefix, resume=True, progress=False, trainer=graph)  # each actor reads

    finally:
        graph.shutdown()
    assert resumed.losses[:2] == [first[CUT], first[CUT + 1]]  # the graph repeats itself exactly from S3
    assert len(resumed.losses) == STEPS - CUT
    for got, want in zip(resumed.losses, unbroken.losses[CUT:]):
        assert abs(got - want) <= GRAPH_REL_TOL * want
    assert latest_checkpoint(s3_prefix) == resumed.checkpoint == f"{s3_prefix}/{CHECKPOINTS_DIR}/step_{STEPS:08d}"


def test_a_crash_while_writing_to_s3_leaves_no_visible_checkpoint(
    s3_prefix: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg()
    trainer = LocalTrainer(cfg)
    rows = torch.randint(0, 512, (2, 4, 33), generator=torch.Generator().manual_seed(0))
    batches = [[(r[:2, :-1], r[:2, 1:]), (r[2:, :-1], r[2:, 1:])] for r in rows]
    state = {"loader": {}, "config": config_to_dict(cfg)}
    trainer.train_step(batches[0])
    first = trainer.save_checkpoint(s3_prefix, state)
    trainer.train_step(batches[1])
    write_json = storage.write_json

    def state_fails(location: str, obj: object) -> None:
        if location.endswith(STATE_FILE):
            raise OSError("connection reset")
        write_json(location, obj)

    with monkeypatch.context() as patch:
        patch.setattr(storage, "write_json", state_fails)
        with pytest.raises(OSError, match="connection reset"):
            trainer.save_checkpoint(s3_prefix, state)

    # no rename on an object store: the parts are there, but without trainer_state.json it is no checkpoint
    assert _files(s3_server, s3_prefix, 2) == sorted([COLOCATED_FILE, CONFIG_FILE, SHARDS_FILE])
    assert latest_checkpoint(s3_prefix) == resolve(s3_prefix).location == first
    assert open_checkpoint(s3_prefix).state["step"] == 1

    second = trainer.save_checkpoint(s3_prefix, state)  # written again, complete this time

    assert latest_checkpoint(s3_prefix) == second and _files(s3_server, s3_prefix, 2) == sorted(
        [COLOCATED_FILE, CONFIG_FILE, SHARDS_FILE, STATE_FILE]
    )
    assert prune_checkpoints(s3_prefix, keep_last=1) == [first]
    assert _files(s3_server, s3_prefix, 1) == [] and latest_checkpoint(s3_prefix) == second


def test_export_from_s3_loads_in_transformers(s3_output: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import DeepseekV3ForCausalLM

    out = tmp_path / "hf"

    assert main(["export", "--checkpoint", s3_output, "--out", str(out)]) == 0

    latest = latest_checkpoint(s3_output)
    assert capsys.readouterr().out == f"exported {latest} -> {out}\n"
    assert (out / TOKENIZER_FILE).read_bytes() == storage.read_bytes(storage.join(latest, TOKENIZER_FILE))
    ours = load_model(s3_output)
    reference = DeepseekV3ForCausalLM.from_pretrained(out).eval()  # transformers has no MTP: the main model
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (reference(ids).logits - ours(ids)).abs().max() <= LOGITS_ATOL


def test_generate_from_s3_equals_generate_from_a_local_copy(
    s3_output: str, local_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    outputs = []
    for checkpoint in (s3_output, str(local_copy)):
        argv = [
            "generate",
            "--checkpoint",
            checkpoint,
            "--prompt",
            "def f(x):",
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ]
        assert main(argv) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    for out in outputs:
        del out["tokens_per_s"]
    assert outputs[0] == outputs[1] and len(outputs[0]["generated_ids"]) == 8
    assert outputs[0]["text"].startswith("def f(x):")


def test_the_serving_graph_reads_its_shares_from_s3(ray_local: object, s3_output: str, local_copy: Path) -> None:
    from raymoe.actors.graph import GraphRunner
    from raymoe.platform.inference.engine import Engine, EngineConfig, run_to_completion
    from raymoe.platform.inference.runner import LocalRunner, cache_blocks
    from raymoe.platform.inference.sampling import SamplingParams
    from raymoe.platform.model.transformer import prepare_for_inference

    location = latest_checkpoint(s3_output)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 1)]
    params = [SamplingParams(max_tokens=12, temperature=0)] * len(prompts)
    config = EngineConfig(prefill_chunk=7, max_batch_size=2)  # speculative: the checkpoint has an MTP module
    local = LocalRunner(prepare_for_inference(load_model(str(local_copy)), torch.float32), cache_blocks(512, 16), 16)
    expected = run_to_completion(Engine(local, config), prompts, params)

    runner = GraphRunner(
        location, open_checkpoint(location).model_config, cache_blocks(512, 16), 16, pp=2, ep=2, dtype=torch.float32
    )
    try:
        engine = Engine(runner, config)
        got = run_to_completion(engine, prompts, params)
        stats = runner.stats()
        draft_proposed = engine.stats()["draft_proposed"]
    finally:
        runner.close()

    assert got == expected and all(len(tokens) == 12 for tokens in got)
    assert draft_proposed > 0
    assert stats["param_bytes"] == 0  # the runner holds no weights: every actor loaded its own share
    shares = stats["actor_param_bytes"]
    assert sorted(shares) == ["Shard(0)", "Shard(1)", "Stage(0)", "Stage(1)"]
    assert sum(shares.values()) == local.param_bytes and max(shares.values()) < local.param_bytes
