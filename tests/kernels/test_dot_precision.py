"""The float32 precision of the kernels' ``tl.dot``: torch's float32 matmul precision, exact by default."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import interpret  # noqa: F401

from raymoe.kernels._common import dot_precision


@pytest.fixture
def restore_precision():  # noqa: ANN201
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize(("setting", "want"), [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_float32_operands_follow_torch(restore_precision: None, setting: str, want: str) -> None:
    torch.set_float32_matmul_precision(setting)
    assert dot_precision(torch.zeros(2, dtype=torch.float32)) == want


def test_bf16_operands_take_the_tensor_cores_default() -> None:
    assert dot_precision(torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.bfloat16)) == "tf32"
