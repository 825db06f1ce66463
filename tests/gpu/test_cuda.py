"""The model, the trainers and serving on a CUDA GPU against the CPU (``make test-gpu``; skipped without CUDA).

float32 everywhere, so that the two devices agree to 1e-4 (the products round differently, the math is
the same); the Triton kernels' own compiled tests are ``tests/kernels`` under ``RAYMOE_TEST_DEVICE=cuda``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from raymoe.platform.config import load_config
from raymoe.platform.model import DeepseekV3

pytestmark = pytest.mark.gpu
TOL = 1e-4


def _batch(seed: int = 0, batch: int = 4, length: int = 33) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_the_model_on_cuda_equals_the_cpu() -> None:
    cfg = load_config("tiny").model
    cpu = DeepseekV3(cfg)
    cpu.init_weights(0)
    gpu = copy.deepcopy(cpu).cuda()
    ids, labels = _batch()
    with torch.no_grad():
        assert (gpu(ids.cuda()).cpu() - cpu(ids)).abs().max() <= TOL
    a, b = cpu.loss(ids, labels), gpu.loss(ids.cuda(), labels.cuda())
    assert _rel(b.loss.item(), a.loss.item()) <= TOL
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        if p.grad is not None:
            scale = max(p.grad.abs().max().item(), 1e-6)
            assert (q.grad.cpu() - p.grad).abs().max().item() <= 1e-3 * scale, name


def test_local_trainer_steps_on_cuda_equal_the_cpu() -> None:
    from raymoe.platform.train.trainer import LocalTrainer

    cpu = LocalTrainer(load_config("tiny", ["parallel.device=cpu"]))
    gpu = LocalTrainer(load_config("tiny", ["parallel.device=cuda"]))
    assert gpu.device.type == "cuda" and next(iter(gpu.optimizer.param_groups[0]["params"])).is_cuda
    for seed in range(3):
        mbs = [_batch(seed)]
        want, got = cpu.train_step(mbs), gpu.train_step(mbs)
        assert _rel(got.loss, want.loss) <= TOL and torch.equal(got.loads, want.loads)


def test_compiled_trainer_on_cuda_equals_the_cpu() -> None:
    """``train.compile`` on CUDA (inductor's Triton kernels for the blocks' dense parts): the CPU's eager steps."""
    from raymoe.platform.train.trainer import LocalTrainer

    cpu = LocalTrainer(load_config("tiny", ["parallel.device=cpu"]))
    gpu = LocalTrainer(load_config("tiny", ["parallel.device=cuda", "train.compile=true"]))
    assert all(b.compiled for b in gpu.model.blocks())
    for seed in range(3):
        mbs = [_batch(seed)]
        want, got = cpu.train_step(mbs), gpu.train_step(mbs)
        assert _rel(got.loss, want.loss) <= TOL and torch.equal(got.loads, want.loads)


def test_graph_training_on_one_gpu_shared_by_fractional_actors(request: pytest.FixtureRequest) -> None:
    """Stages and shards each reserve a quarter of the one GPU and train on it: the local trainer's steps (CPU)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("moto")  # the session's Ray starts after the tests' S3 server
    request.getfixturevalue("ray_local")

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the test's Ray sees no GPU")
    from raymoe.actors.driver import GraphTrainer
    from raymoe.platform.train.loop import micro_batches
    from raymoe.platform.train.trainer import LocalTrainer

    layout = ["parallel.pp=2", "parallel.ep=2", "parallel.micro_batches=2", "parallel.device=cuda",
              "parallel.num_gpus_per_actor=0.25", "train.batch_size=8"]  # fmt: skip
    graph = GraphTrainer(load_config("tiny", layout))
    local = LocalTrainer(load_config("tiny", ["parallel.device=cpu", "parallel.micro_batches=2", "train.batch_size=8"]))
    try:
        for seed in range(3):
            mbs = micro_batches(*_batch(seed, batch=8), 2)
            want, got = local.train_step(mbs), graph.train_step(mbs)
            assert _rel(got.loss, want.loss) <= TOL and torch.equal(got.loads, want.loads)
    finally:
        graph.shutdown()


@pytest.mark.parametrize("speculative", [False, True])
def test_serving_on_cuda_gives_the_cpus_greedy_tokens(speculative: bool) -> None:
    from raymoe.platform.inference.engine import generate
    from raymoe.platform.model.transformer import prepare_for_inference

    cfg = load_config("tiny").model
    cpu = DeepseekV3(cfg)
    cpu.init_weights(0)
    prepare_for_inference(cpu, torch.float32)
    gpu = copy.deepcopy(cpu).cuda()
    prompts = [[5, 17, 42, 7], [1] * 20, [300, 2]]
    want = generate(cpu, prompts, 16, speculative=speculative)
    assert generate(gpu, prompts, 16, speculative=speculative) == want  # the paged decode kernel on CUDA
