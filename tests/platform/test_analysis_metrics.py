"""Routing metrics on hand-built routing records against values computed by hand (docs/analysis.md)."""

from __future__ import annotations

import math

import pytest
import torch

from raymoe.platform.analysis import metrics as m
from raymoe.platform.analysis.capture import LayerRouting, RoutingRecord
from raymoe.platform.analysis.experts import layer_rows, routing_report, saturation_report
from raymoe.platform.model.moe import route

# four tokens, top-2 of four experts: expert 0 four times, 1 twice, 2 and 3 once
IDX = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
TOKENS = torch.tensor([5, 5, 7, 5])


def test_load_maxvio_entropy_and_effective_experts() -> None:
    counts = m.expert_counts(IDX, 4)
    assert counts.tolist() == [4, 2, 1, 1]
    assert m.max_vio(counts) == pytest.approx((4 - 2) / 2)
    # p = (1/2, 1/4, 1/8, 1/8): H = 1/2 ln 2 + 1/4 ln 4 + 2 · 1/8 ln 8 = 1.75 ln 2
    assert m.routing_entropy(counts) == pytest.approx(1.75 * math.log(2))
    assert m.effective_experts(counts) == pytest.approx(2**1.75)
    assert m.effective_experts(torch.ones(8)) == pytest.approx(8.0)  # uniform: E
    assert m.effective_experts(torch.tensor([0.0, 5.0, 0.0])) == pytest.approx(1.0)  # one expert
    assert m.max_vio(torch.zeros(4)) == 0.0 and m.routing_entropy(torch.zeros(4)) == 0.0
    valid = torch.tensor([True, False, True, True])
    assert m.expert_counts(IDX, 4, valid).tolist() == [3, 2, 0, 1]


def test_domain_specialization_is_the_share_of_a_domains_tokens() -> None:
    counts = torch.tensor([[4.0, 2.0, 1.0, 1.0], [0.0, 0.0, 3.0, 3.0]])  # domain 1: 3 tokens, all on experts 2 and 3
    spec = m.domain_specialization(counts, torch.tensor([4.0, 3.0]))
    assert spec.tolist() == [[1.0, 0.5, 0.25, 0.25], [0.0, 0.0, 1.0, 1.0]]
    assert torch.allclose(spec.sum(dim=1), torch.tensor([2.0, 2.0], dtype=torch.float64))  # K per domain
    assert torch.allclose((spec / 2).sum(dim=1), torch.ones(2, dtype=torch.float64))  # divided by K: 1
    empty = m.domain_specialization(torch.zeros(1, 4), torch.zeros(1))
    assert empty.tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_coactivation_counts_all_pairs_of_the_top_k() -> None:
    c = m.coactivation(IDX, 4)
    # expert 0: 4 tokens, with 1 on two of them, with 2 and with 3 on one each
    assert c[0].tolist() == [0.0, 0.5, 0.25, 0.25]
    assert c[1].tolist() == [1.0, 0.0, 0.0, 0.0] and c[2, 0] == 1.0 and c[3, 0] == 1.0
    three = m.coactivation(torch.tensor([[0, 1, 2]]), 4)  # all pairs: 0 and 2 co-occur (not only neighbours)
    assert three[0, 2] == 1.0 and three[2, 0] == 1.0 and three[3].tolist() == [0.0] * 4


def test_vocabulary_specialization_of_each_token() -> None:
    vocab, counts, spec = m.vocab_specialization(IDX, TOKENS, 4)
    assert vocab.tolist() == [5, 7] and counts.tolist() == [3, 1]
    # token 5 on rows 0, 1, 3: expert 0 every time, experts 1, 2, 3 once each
    assert spec[0].tolist() == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3])
    assert spec[1].tolist() == [1.0, 1.0, 0.0, 0.0]
    mean_max, top = m.vocab_summary(vocab, counts, spec, min_count=1, top=2)
    assert mean_max == pytest.approx(1.0)
    assert top[1] == [(7, 1.0, 1), (5, pytest.approx(1 / 3), 3)] and top[2] == [(5, pytest.approx(1 / 3), 3)]
    only_frequent, top = m.vocab_summary(vocab, counts, spec, min_count=2, top=2)
    assert only_frequent == pytest.approx(1.0) and top[1] == [(5, pytest.approx(1 / 3), 3)]
    assert m.vocab_summary(vocab, counts, spec, min_count=9, top=2) == (0.0, {})


def test_router_saturation() -> None:
    assert m.router_saturation(IDX, IDX) == 1.0
    # row 0: both experts kept (order does not matter), row 1: one of two
    assert m.router_saturation(torch.tensor([[1, 0], [2, 4]]), torch.tensor([[0, 1], [2, 3]])) == 0.75
    with pytest.raises(ValueError, match="different rows"):
        m.router_saturation(IDX, IDX[:2])


def test_masking_picks_the_most_routed_and_the_gate_never_chooses_a_masked_expert() -> None:
    assert m.top_experts(torch.tensor([4.0, 2.0, 1.0, 1.0]), 3) == [0, 1, 2]  # tie: the lower id
    a = m.random_experts(8, 3, torch.Generator().manual_seed(0))
    assert a == m.random_experts(8, 3, torch.Generator().manual_seed(0)) and len(set(a)) == 3
    bias = torch.zeros(8)
    assert m.masked_bias(bias, []).tolist() == bias.tolist()
    # the tiny preset's routing: 8 experts, top-2, 4 groups of which 2 are kept: half can be masked
    limit = m.max_mask_ratio(8, 2, 4, 2)
    assert limit == 0.5 and m.max_mask_ratio(16, 4, 1, 1) == 0.75
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(512, 8, generator=gen)
    for _ in range(20):
        masked = m.random_experts(8, int(limit * 8), gen)
        idx = route(scores, m.masked_bias(torch.randn(8, generator=gen) * 0.1, masked), 2, 4, 2)
        assert not set(idx.reshape(-1).tolist()) & set(masked)


def _record(idx_by_layer: dict[int, torch.Tensor], tokens: torch.Tensor, predicted: torch.Tensor) -> RoutingRecord:
    """One sequence (B = 1) with its layers' routing; layer 3 is the MTP module of a 3-layer model."""
    labels = torch.cat([tokens[1:], torch.tensor([-100])]).unsqueeze(0)
    layers = {layer: LayerRouting(idx, torch.full(idx.shape, 0.5)) for layer, idx in idx_by_layer.items()}
    return RoutingRecord(tokens.unsqueeze(0), labels, 3, layers, {0: predicted, 1: predicted})


def test_a_record_names_what_each_layer_saw() -> None:
    rec = _record({1: IDX, 3: IDX}, TOKENS, torch.tensor([1, 2, 3, 4]))
    inputs, predicted, valid = rec.tokens(1)
    assert inputs.tolist() == TOKENS.tolist() and valid.all() and predicted.tolist() == [1, 2, 3, 4]
    # MTP depth 1 embeds t_{i+1} = labels[i] and has a target t_{i+2} for i < S - 2 (the last label is ignored)
    inputs, _, valid = rec.tokens(3)
    assert inputs.tolist() == [5, 7, 5, 0] and valid.tolist() == [True, True, False, False]
    assert layer_rows([rec, rec], 3).idx.tolist() == IDX[:2].tolist() * 2


def test_routing_report_over_two_domains() -> None:
    a = _record({1: IDX}, TOKENS, TOKENS)
    b = _record({1: torch.tensor([[2, 3], [2, 3], [3, 2]])}, torch.tensor([9, 9, 9]), torch.tensor([1, 1, 1]))
    (entry,) = routing_report({"a": [a], "b": [b]}, n_experts=4, min_count=1, top_tokens=2)
    assert entry["name"] == "layer 1" and entry["tokens"] == 7
    assert entry["domain_specialization"]["a"] == [1.0, 0.5, 0.25, 0.25]
    assert entry["domain_specialization"]["b"] == [0.0, 0.0, 1.0, 1.0]
    assert entry["load"] == [4.0, 2.0, 4.0, 4.0] and entry["domains"]["a"]["load"] == [4.0, 2.0, 1.0, 1.0]
    assert entry["maxvio"] == pytest.approx((4 - 3.5) / 3.5)
    assert entry["domains"]["b"]["effective_experts"] == pytest.approx(2.0)
    assert entry["mean_gate_weight"] == [0.5] * 4
    assert entry["vocab"]["input"]["top_tokens"]["3"][0] == [9, 1.0, 3]
    assert entry["vocab"]["predicted"]["mean_max_specialization"] == pytest.approx(1.0)
    assert entry["coactivation"][2][3] == 0.75  # expert 2: once with 0 (domain a), three times with 3 (b)


def test_saturation_against_the_final_checkpoint() -> None:
    final = [_record({1: IDX}, TOKENS, TOKENS)]
    early = [_record({1: torch.tensor([[1, 0], [2, 3], [1, 3], [3, 0]])}, TOKENS, TOKENS)]
    report = saturation_report({10: early, 20: final})
    assert report["steps"] == [10, 20] and report["final_step"] == 20
    assert report["layers"]["layer 1"] == [pytest.approx((1 + 0.5 + 0.5 + 1) / 4), 1.0]
    assert report["mean"][-1] == 1.0
