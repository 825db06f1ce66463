"""What the kernel tests share: Triton's interpreter on (or a GPU), and tolerances per dtype.

With ``RAYMOE_TEST_DEVICE=cuda`` (``make test-gpu``) the same tests run compiled on a GPU: the
interpreter stays off and every tensor a test makes is on CUDA (``torch.set_default_device``);
tests about the CPU (:data:`cpu_only`) are skipped there.

Import this module before anything that imports triton: Triton 3.9 reads ``TRITON_INTERPRET``
when ``@triton.jit`` decorates a function (``triton/runtime/jit.py``), and ``triton.language``'s
helpers (``tl.zeros``, ``tl.max`` ...) are decorated when ``triton`` is imported, so the flag has
to be in the environment before the process's first ``import triton``. Nothing that the test
session imports before these modules imports triton (raymoe's model imports the kernel modules
only when a kernel runs). Not a conftest.py: a second ``conftest`` module would shadow
``tests/conftest.py`` for ``from conftest import ...`` elsewhere.
"""

from __future__ import annotations

import os

GPU = os.environ.get("RAYMOE_TEST_DEVICE") == "cuda"
if not GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: see above

import pytest  # noqa: E402
import torch  # noqa: E402

cpu_only = pytest.mark.skipif(GPU, reason="a test of the CPU path (the interpreter, CPU tensors)")

# Tolerances per dtype (max abs error relative to max(1, the reference's max magnitude)): float32
# is exact up to summation order; float16 and bf16 outputs round to 11 and 8 significant bits.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def interpret(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """The kernel switch at its default for one test; fails early if triton was imported compiled-only.

    On a GPU run: every tensor the test makes is on CUDA."""
    from raymoe.kernels._common import interpreting

    monkeypatch.delenv("RAYMOE_KERNELS", raising=False)
    if GPU:
        if not torch.cuda.is_available():
            pytest.skip("RAYMOE_TEST_DEVICE=cuda, but torch sees no CUDA device")
        torch.set_default_device("cuda")
        try:
            yield
        finally:
            torch.set_default_device("cpu")
        return
    assert interpreting(), "triton was imported before TRITON_INTERPRET=1 was set: import kernel_testing first"
    yield


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Max abs error within TOLERANCE[dtype] × max(1, max |expected|)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    bound = TOLERANCE[dtype] * max(1.0, expected.float().abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} ({dtype})"
