"""The single-process training step: accumulation, clipping, schedule, bf16."""

from __future__ import annotations

import copy

import pytest
import torch

from raymoe.platform.config import load_config
from raymoe.platform.train.optim import cosine_lr
from raymoe.platform.train.trainer import LocalTrainer


def test_two_micro_batches_equal_one_batch() -> None:
    cfg = load_config("tiny", ["train.steps=3", "train.grad_clip=0.5"])
    a = LocalTrainer(cfg)
    b = LocalTrainer(cfg, model=copy.deepcopy(a.model))
    ids = torch.randint(0, cfg.model.vocab_size, (4, 17))
    for _ in range(3):
        ma = a.train_step([(ids[:, :-1], ids[:, 1:])])
        mb = b.train_step([(ids[:2, :-1], ids[:2, 1:]), (ids[2:, :-1], ids[2:, 1:])])
        assert abs(ma.loss - mb.loss) < 1e-5
        assert torch.equal(ma.loads, mb.loads)
        assert abs(ma.grad_norm - mb.grad_norm) < 1e-4
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-5), name


def test_loss_decreases_on_a_learnable_stream() -> None:
    cfg = load_config("tiny", ["train.steps=25", "train.lr=3e-3"])
    trainer = LocalTrainer(cfg)
    stream = torch.arange(2000) % 37  # a periodic, learnable token stream
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(25):
        starts = torch.randint(0, 2000 - 33, (4,), generator=gen).tolist()
        windows = torch.stack([stream[s : s + 33] for s in starts])
        losses.append(trainer.train_step([(windows[:, :-1], windows[:, 1:])]).loss)
    assert losses[-1] < losses[0] * 0.7
    assert trainer.step == 25


def test_cosine_schedule() -> None:
    assert cosine_lr(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert cosine_lr(10, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 1.0, 10, 0.1) == pytest.approx(0.55)
    assert cosine_lr(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_bf16_mixed_precision_keeps_fp32_master_weights() -> None:
    cfg = load_config("tiny", ["train.dtype=bf16"])
    trainer = LocalTrainer(cfg)
    ref = LocalTrainer(load_config("tiny"), model=copy.deepcopy(trainer.model))
    ids = torch.randint(0, cfg.model.vocab_size, (2, 17))
    m16 = trainer.train_step([(ids[:, :-1], ids[:, 1:])])
    m32 = ref.train_step([(ids[:, :-1], ids[:, 1:])])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    state = trainer.optimizer.state[next(trainer.model.parameters())]
    assert state["exp_avg"].dtype == torch.float32
    assert abs(m16.loss - m32.loss) < 0.05 * m32.loss  # bf16 rounding, not a different model
