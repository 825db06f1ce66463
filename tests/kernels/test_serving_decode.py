"""The serving engine with the kernels forced on (interpreted): its paged MLA decode gives the torch path's tokens."""

from __future__ import annotations

import kernel_testing  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
import torch

from raymoe.kernels import dispatch
from raymoe.platform.config import load_config
from raymoe.platform.generate import prepare_for_inference
from raymoe.platform.inference.engine import Engine, EngineConfig, run_to_completion
from raymoe.platform.inference.runner import LocalRunner, cache_blocks
from raymoe.platform.inference.sampling import SamplingParams
from raymoe.platform.model.transformer import DeepseekV3


def test_engine_decode_with_the_mla_kernel_equals_torch(monkeypatch) -> None:
    model = DeepseekV3(load_config("tiny").model)
    model.init_weights(0)
    prepare_for_inference(model, torch.float32)
    prompts = [[5, 17, 42, 7, 9], [3], [100, 200, 300]]  # decode steps over three lengths at once
    params = [SamplingParams(max_tokens=4, temperature=0)] * 3

    def run() -> list[list[int]]:
        engine = Engine(LocalRunner(model, cache_blocks(64, 4), 4), EngineConfig(cache_tokens=64, block_size=4))
        return run_to_completion(engine, prompts, params)

    reference = run()
    calls = []
    kernel = dispatch.mla_decode
    monkeypatch.setattr("raymoe.platform.inference.forward.mla_decode", lambda *a: calls.append(1) or kernel(*a))
    with dispatch.use_kernels("triton"):
        assert run() == reference
    assert calls, "the decode steps did not go through the MLA decode kernel"
