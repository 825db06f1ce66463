"""The serving engine with the kernels forced on (interpreted): its paged MLA decode gives the torch path's tokens."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import interpret  # noqa: F401  (TRITON_INTERPRET before triton is imported; CUDA on a GPU run)

from raymoe.kernels import dispatch
from raymoe.platform.config import load_config
from raymoe.platform.inference.engine import Engine, EngineConfig, run_to_completion
from raymoe.platform.inference.runner import LocalRunner, cache_blocks
from raymoe.platform.inference.sampling import SamplingParams
from raymoe.platform.model.transformer import DeepseekV3, prepare_for_inference


@pytest.mark.parametrize("speculative", [False, True])
def test_engine_decode_with_the_mla_kernel_equals_torch(monkeypatch: pytest.MonkeyPatch, speculative: bool) -> None:
    """Continuous batching over three prompts: decode steps are one-token runs, or with MTP drafts two-token
    runs (a token and its draft: two query rows of one sequence); the kernel gives the torch path's tokens."""
    model = DeepseekV3(load_config("tiny").model)
    model.init_weights(0)
    prepare_for_inference(model, torch.float32)
    prompts = [[5, 17, 42, 7, 9], [3], [100, 200, 300]]  # decode steps over three lengths at once
    params = [SamplingParams(max_tokens=4, temperature=0)] * 3

    def run() -> tuple[list[list[int]], dict]:
        config = EngineConfig(cache_tokens=64, block_size=4, speculative=speculative)
        engine = Engine(LocalRunner(model, cache_blocks(64, 4), 4), config)
        assert engine.speculative == speculative  # the tiny preset has an MTP module
        return run_to_completion(engine, prompts, params), engine.stats()

    reference, ref_stats = run()
    runs_seen = []  # each kernel call's query rows per sequence (the sequences told apart by their first block)
    kernel = dispatch.mla_decode

    def counted(q_lat, q_pe, cache, block_table, seq_lens, scale):  # noqa: ANN001, ANN202
        runs_seen.append(sorted(torch.unique(block_table[:, 0], return_counts=True)[1].tolist()))
        return kernel(q_lat, q_pe, cache, block_table, seq_lens, scale)

    monkeypatch.setattr(dispatch, "mla_decode", counted)
    with dispatch.use_kernels("triton"):
        tokens, stats = run()
    assert tokens == reference
    decode_run = [2, 2, 2] if speculative else [1, 1, 1]
    assert decode_run in runs_seen, f"no decode step of {decode_run[0]}-token runs went through the kernel"
    if speculative:
        assert stats["draft_proposed"] == ref_stats["draft_proposed"] > 0
        assert stats["draft_accepted"] == ref_stats["draft_accepted"]
