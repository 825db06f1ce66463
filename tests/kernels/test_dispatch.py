"""The kernel switch, and the model with the kernels forced on (interpreted) against its torch path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kernel_testing import assert_close, cpu_only, interpret  # noqa: F401

from raymoe.kernels import kernel_mode, use_kernels, use_triton
from raymoe.platform.config import load_config
from raymoe.platform.inference.batch import SeqRun, build_step
from raymoe.platform.inference.runner import LocalRunner
from raymoe.platform.model.transformer import DeepseekV3, prepare_for_inference


@cpu_only
def test_switch_env_and_context(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(1)
    assert kernel_mode() == "auto" and not use_triton(cpu)  # auto: CUDA tensors only
    monkeypatch.setenv("RAYMOE_KERNELS", "triton")
    assert kernel_mode() == "triton" and use_triton(cpu)
    with use_kernels("torch"):
        assert not use_triton(cpu)
        with use_kernels("auto"):
            assert kernel_mode() == "auto"
        assert kernel_mode() == "torch"
    assert kernel_mode() == "triton"
    monkeypatch.setenv("RAYMOE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="RAYMOE_KERNELS must be one of auto\\|triton\\|torch"):
        kernel_mode()
    with pytest.raises(ValueError, match="use_kernels\\(mode\\) must be one of"):
        with use_kernels("fast"):
            pass


@cpu_only
def test_forcing_triton_on_cpu_without_the_interpreter_says_how() -> None:
    """A fresh process without TRITON_INTERPRET: a forced kernel on CPU tensors raises a clear error."""
    code = (
        "import torch\n"
        "from raymoe.kernels import use_kernels\n"
        "from raymoe.platform.model.layers import RMSNorm\n"
        "with use_kernels('triton'):\n"
        "    try:\n"
        "        RMSNorm(8)(torch.randn(2, 8))\n"
        "    except RuntimeError as e:\n"
        "        print('ERROR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RAYMOE_KERNELS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERROR Triton kernel _rmsnorm_kernel got tensors on ['cpu']" in out.stdout, out.stderr
    assert "TRITON_INTERPRET=1 before the first `import triton`" in out.stdout


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls of each Triton entry point of the dispatch (to see that the model used them)."""
    from raymoe.kernels import dispatch

    calls: dict[str, int] = {}
    for name in ("rms_norm", "moe_permute", "moe_unpermute", "grouped_swiglu", "mla_decode"):
        original = getattr(dispatch, name)

        def counted(*args, _name=name, _original=original, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(dispatch, name, counted)
    return calls


@pytest.fixture
def tiny_model() -> DeepseekV3:
    model = DeepseekV3(load_config("tiny").model)
    model.init_weights(seed=3)
    # larger than the init's 0.02 so that routing and attention are not near-uniform
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8)
    return model


def test_model_forward_and_training_grads_equal_reference(tiny_model: DeepseekV3, kernel_calls: dict) -> None:
    ids = torch.randint(0, tiny_model.cfg.vocab_size, (2, 11))
    labels = torch.randint(0, tiny_model.cfg.vocab_size, (2, 11))
    results = {}
    for mode in ("torch", "triton"):
        kernel_calls.clear()
        tiny_model.zero_grad()
        with use_kernels(mode):
            logits = tiny_model(ids)
            tiny_model.loss(ids, labels).loss.backward()
        grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
        results[mode] = (logits.detach(), grads)
    assert {k: v > 0 for k, v in kernel_calls.items()} == {
        "rms_norm": True,
        "moe_permute": True,
        "moe_unpermute": True,
        "grouped_swiglu": True,
    }  # the triton run went through the kernels (no decode here)
    (ref_logits, ref_grads), (logits, grads) = results["torch"], results["triton"]
    assert_close(logits, ref_logits, torch.float32, "logits")
    assert set(grads) == set(ref_grads)
    for name in [
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
        "model.norm.weight",
    ]:
        assert ref_grads[name].abs().max() > 0
    for name, g in grads.items():
        assert_close(g, ref_grads[name], torch.float32, f"grad {name}")


# Sequences of a paged step (first block of each table is never block 0, the padding block), shuffled blocks
BLOCK_SIZE = 4
TABLES = [[5, 1, 7], [2, 6], [4, 3, 8]]
# the tiny preset's naive_min_run is unbounded (every run absorbed); 3 here makes the prefill step mix both paths
NAIVE_MIN_RUN = 3


def _steps(ids: torch.Tensor) -> list[tuple[str, list[SeqRun]]]:
    """A prefill step (runs of 7 and 5 tokens naive, one of 2 absorbed), a step of one-token runs (decode)
    and one of two-token runs (a token and its MTP draft: two query rows of one sequence)."""
    lengths = [[7, 2, 5], [1, 1, 1], [2, 2, 2]]
    steps, starts = [], [0, 0, 0]
    for name, step in zip(("prefill", "one-token runs", "two-token runs"), lengths):
        runs = [SeqRun(ids[b, starts[b] : starts[b] + n].tolist(), starts[b], TABLES[b]) for b, n in enumerate(step)]
        steps.append((name, runs))
        starts = [s + n for s, n in zip(starts, step)]
    return steps


def _paged_logits(model: DeepseekV3, steps: list[tuple[str, list[SeqRun]]]) -> list[tuple[torch.Tensor, ...]]:
    """Every row's main logits and MTP draft logits of each step, on a LocalRunner over a fresh paged cache."""
    runner = LocalRunner(model, num_blocks=9, block_size=BLOCK_SIZE)
    out = []
    for _, runs in steps:
        batch = build_step(runs, BLOCK_SIZE, NAIVE_MIN_RUN)
        rows = torch.arange(batch.num_rows)
        logits, hidden = runner.main(batch, rows, rows)
        out.append((logits, runner.mtp(batch, hidden, rows)))
    return out


def test_paged_steps_with_the_decode_kernel_equal_reference(tiny_model: DeepseekV3, kernel_calls: dict) -> None:
    """The serving runner's steps over the paged cache (absorbed MLA -> the decode kernel) under both switches."""
    prepare_for_inference(tiny_model, torch.float32)
    ids = torch.randint(0, tiny_model.cfg.vocab_size, (3, 10))
    steps = _steps(ids)
    outs = {}
    for mode in ("torch", "triton"):
        kernel_calls.clear()
        with use_kernels(mode):
            outs[mode] = _paged_logits(tiny_model, steps)
        if mode == "triton":  # one call per step and attention layer (main layers and the MTP module)
            assert kernel_calls["mla_decode"] == len(steps) * (tiny_model.cfg.num_hidden_layers + 1)
        else:
            assert "mla_decode" not in kernel_calls
    # the steps are what they claim: the torch path's main logits are the whole-sequence forward's
    with torch.no_grad():
        full = tiny_model(ids)  # [3, 10, V]
    for (name, runs), (logits, _) in zip(steps, outs["torch"]):
        expected = torch.cat([full[b, r.start : r.start + len(r.tokens)] for b, r in enumerate(runs)])
        assert_close(logits, expected, torch.float32, f"{name}: paged (torch) against the whole-sequence forward")
    for (name, _), (logits, drafts), (ref_logits, ref_drafts) in zip(steps, outs["triton"], outs["torch"]):
        assert_close(logits, ref_logits, torch.float32, f"{name}: main logits")
        assert_close(drafts, ref_drafts, torch.float32, f"{name}: MTP draft logits")
