"""Routing capture from the one forward, the local analysis source, the masking ablation and the default domains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raymoe.platform.analysis.capture import RoutingRecorder
from raymoe.platform.analysis.domains import (
    DEFAULT_DOMAINS,
    domain_batches,
    is_test_file,
    read_domain_texts,
    split_source,
    stdlib_domain_texts,
)
from raymoe.platform.analysis.experts import LocalSource, masking_ablation, routing_report
from raymoe.platform.analysis.options import AnalysisError
from raymoe.platform.analysis.run import check_routing_layers, checkpoints_of_run
from raymoe.platform.data.shards import DataError
from raymoe.platform.model import forward
from raymoe.platform.model.moe import route
from raymoe.platform.model.transformer import DeepseekV3
from raymoe.platform.train.balance import LoadCounter

from conftest import tiny_variant


def _model(seed: int = 0) -> DeepseekV3:
    cfg = tiny_variant()
    model = DeepseekV3(cfg)
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # biases a training run would have moved: the biased scores differ from the affinities
        for gate in model.gates():
            gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=gen) * 0.05)
    return model.eval()


def _batches(n: int, seed: int = 0, b: int = 2, s: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 512, (b, s + 1), generator=gen)
        out.append((x[:, :-1].contiguous(), x[:, 1:].contiguous()))
    return out


@torch.no_grad()
def test_the_recorder_sees_what_the_gates_chose_and_changes_nothing() -> None:
    model = _model()
    cfg = model.cfg
    ((input_ids, labels),) = _batches(1)
    plain = forward.loss(model, input_ids, labels, mtp_lambda=0.3)
    recorder = RoutingRecorder(model)
    counter = LoadCounter(list(model.moe_by_layer()), cfg.n_routed_experts, inner=recorder)
    recorded = forward.loss(model, input_ids, labels, mtp_lambda=0.3, hooks=counter)
    assert torch.equal(recorded.loss, plain.loss)  # capture on: the same numbers
    rec = recorder.record(input_ids, labels, cfg.num_hidden_layers)
    assert list(rec.layers) == [1, 2, 3]  # two main MoE layers and the MTP module's
    N = input_ids.numel()
    for i, (layer, r) in enumerate(rec.layers.items()):
        bias = model.moe_by_layer()[layer].gate.e_score_correction_bias
        assert r.idx.shape == (N, cfg.num_experts_per_tok) and r.biased.shape == (N, cfg.n_routed_experts)
        # the biased scores are what the choice ranked: routing them again (bias removed) gives the same experts
        assert torch.equal(route(r.biased - bias, bias, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group), r.idx)
        assert torch.allclose(r.weights.sum(-1), torch.full((N,), cfg.routed_scaling_factor))
        counts = torch.bincount(r.idx.reshape(-1), minlength=cfg.n_routed_experts)
        assert torch.equal(counter.loads()[i], counts.float())
    assert torch.equal(rec.predicted[0], model(input_ids).reshape(N, -1).argmax(-1))
    assert set(rec.predicted) == {0, 1}
    assert recorder.take() == ({}, {})  # taken: the next forward starts empty


def test_scores_can_be_left_out() -> None:
    model = _model()
    ((input_ids, labels),) = _batches(1)
    recorder = RoutingRecorder(model, keep_scores=False)
    with torch.no_grad():
        forward.loss(model, input_ids, labels, mtp_lambda=0.0, hooks=recorder)
    layers, _ = recorder.take()
    assert list(layers) == [1, 2] and all(r.biased is None for r in layers.values())  # λ = 0: no MTP module ran


def test_masking_nothing_is_the_plain_loss_and_masking_changes_it() -> None:
    source = LocalSource(_model())
    batches = {"a": _batches(1, seed=1), "b": _batches(1, seed=2)}
    records = {d: source.record(b) for d, b in batches.items()}
    layers = routing_report(records, 8)
    loads = {d: {e["layer"]: torch.tensor(e["domains"][d]["load"]) for e in layers if e["layer"] < 3} for d in batches}
    before = source.biases()
    out = masking_ablation(source, batches, loads, [0.0, 0.25, 0.5], 8)
    for d in batches:
        assert out["top"]["a"][d][0] == out["plain"][d] == out["random"][d][0] == source.loss(batches[d])
        assert out["top"]["a"][d][2] != out["plain"][d]
    assert out["masked_experts"] == [0, 2, 4] and out["layers"] == [1, 2]
    assert all(torch.equal(before[k], v) for k, v in source.biases().items())  # restored


def test_the_default_domains_follow_the_stated_rule() -> None:
    assert is_test_file(Path("test/test_os.py")) and is_test_file(Path("unittest/test/x.py"))
    assert is_test_file(Path("test_foo.py")) and not is_test_file(Path("json/decoder.py"))
    source = '"""Module doc."""\nimport os  # why\n\n\n# lone\ndef f():\n    """Doc of f."""\n    return 1\n'
    code, docs = split_source(source)
    assert code == "import os\n\ndef f():\n    return 1"
    assert docs == "Module doc.\nwhy\nlone\nDoc of f."
    texts = stdlib_domain_texts(20_000)
    assert tuple(texts) == DEFAULT_DOMAINS
    assert all(sum(map(len, t)) >= 20_000 and len(t) >= 3 for t in texts.values())
    assert not any('"""' in t for t in texts["code"]) and "def " in "".join(texts["tests"])


class _Encoding:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


class _CharTokenizer:
    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[_Encoding]:
        return [_Encoding([ord(c) % 100 for c in t]) for t in texts]


def test_domain_texts_and_batches(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abcdefgh")
    (tmp_path / "b.jsonl").write_text('{"text": "ijklmnop"}\n')
    assert read_domain_texts(str(tmp_path), 1000) == ["abcdefgh", "ijklmnop"]
    with pytest.raises(DataError, match="nowhere"):
        read_domain_texts(str(tmp_path / "nowhere"), 1000)
    batches = domain_batches(["abcdefgh", "ijklmnop"], _CharTokenizer(), 1, seq_len=4, sequences=3, batch_size=2)
    assert [b[0].shape[0] for b in batches] == [2, 1]
    ids = [ord(c) % 100 for c in "abcdefgh"] + [1]
    assert batches[0][0][0].tolist() == ids[:4] and batches[0][1][0].tolist() == ids[1:5]  # labels: the next tokens
    with pytest.raises(DataError, match="domain 'x'"):
        domain_batches(["ab"], _CharTokenizer(), 1, seq_len=8, sequences=1, batch_size=1, name="x")


def test_a_model_without_routing_layers_is_named() -> None:
    check_routing_layers(tiny_variant(), "ok")
    with pytest.raises(AnalysisError, match="ckpt/ has no routing layers"):
        check_routing_layers(tiny_variant(first_k_dense_replace=3, num_nextn_predict_layers=0), "ckpt/")
    check_routing_layers(tiny_variant(first_k_dense_replace=3), "the MTP module routes")


def test_the_checkpoints_of_a_run(tmp_path: Path) -> None:
    for step in (5, 10, 20):
        d = tmp_path / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_00000030").mkdir()  # incomplete: no trainer_state.json
    at = str(tmp_path / "checkpoints" / "step_00000010")
    assert [s for s, _ in checkpoints_of_run(at)] == [5, 10]
    assert checkpoints_of_run(str(tmp_path / "elsewhere")) == []
