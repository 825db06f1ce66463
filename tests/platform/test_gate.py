"""The sigmoid, group-limited gate and the auxiliary-loss-free bias rule."""

from __future__ import annotations

import copy

import torch

from raymoe.platform.config import load_config
from raymoe.platform.model import Gate, MoE, route, sequence_balance_loss
from raymoe.platform.train.balance import LoadCounter, bias_delta, gamma_at, max_violation
from raymoe.platform.train.trainer import LocalTrainer

from conftest import tiny_variant


def make_gate(**changes) -> Gate:
    cfg = tiny_variant(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3, **changes)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=1.0)
    return gate


def test_choices_respect_the_group_limit() -> None:
    gate = make_gate()
    x = torch.randn(500, gate.weight.shape[1])
    _, idx, _ = gate(x)
    groups = idx // 4  # 4 experts per group
    for row in groups:
        assert len(set(row.tolist())) <= 2


def test_groups_are_scored_by_their_top_two_biased_affinities() -> None:
    # group 0 has one very high expert, group 1 two fairly high ones: top-2 sum prefers group 1
    scores = torch.tensor([[0.99, 0.0, 0.0, 0.0, 0.6, 0.6, 0.0, 0.0]])
    idx = route(scores, torch.zeros(8), top_k=2, n_group=2, topk_group=1)
    assert sorted(idx[0].tolist()) == [4, 5]
    # a bias lifting expert 1 makes group 0 win
    bias = torch.zeros(8)
    bias[1] = 0.5
    idx = route(scores, bias, top_k=2, n_group=2, topk_group=1)
    assert sorted(idx[0].tolist()) == [0, 1]


def test_bias_changes_the_choice_but_not_the_weights() -> None:
    gate = make_gate(norm_topk_prob=True, routed_scaling_factor=2.5)
    x = torch.randn(64, gate.weight.shape[1])
    w0, idx0, scores = gate(x)
    gate.e_score_correction_bias[7] = 5.0  # expert 7 now chosen by every token
    w1, idx1, _ = gate(x)
    assert (idx1 == 7).any(dim=1).all()
    assert not torch.equal(idx0, idx1)
    # weights are the *unbiased* affinities of the chosen experts, normalized, × 2.5
    expected = scores.gather(1, idx1)
    expected = expected / expected.sum(dim=1, keepdim=True) * 2.5
    assert torch.allclose(w1, expected, atol=1e-6)
    assert torch.allclose(w1.sum(dim=1), torch.full((64,), 2.5), atol=1e-5)


def test_sign_rule() -> None:
    loads = torch.tensor([[10.0, 2.0, 4.0, 0.0], [4.0, 4.0, 4.0, 4.0]])
    delta = bias_delta(loads, 0.001)
    assert torch.equal(delta[0], torch.tensor([-0.001, 0.001, 0.0, 0.001]))  # mean 4: load 4 stays
    assert torch.equal(delta[1], torch.zeros(4))
    assert torch.allclose(max_violation(loads), torch.tensor([1.5, 0.0]))


def test_update_uses_the_whole_steps_loads() -> None:
    # the bias moves by the sign rule applied to the *sum* of the micro-batches' loads
    cfg = load_config("tiny", ["train.steps=3", "train.bias_update_speed=0.01"])
    trainer = LocalTrainer(cfg)
    probe = copy.deepcopy(trainer.model)
    ids = torch.randint(0, cfg.model.vocab_size, (4, 17))
    micro = [(ids[:2, :-1], ids[:2, 1:]), (ids[2:, :-1], ids[2:, 1:])]
    per_micro = []
    counter = LoadCounter(list(probe.moe_by_layer()), cfg.model.n_routed_experts)
    with torch.no_grad():
        for input_ids, labels in micro:
            probe.loss(input_ids, labels, mtp_lambda=cfg.train.mtp_lambda, hooks=counter)
            per_micro.append(counter.loads())
            counter.reset()
    total = per_micro[0] + per_micro[1]
    before = torch.stack([g.e_score_correction_bias.clone() for g in trainer.gates])
    metrics = trainer.train_step(micro)
    after = torch.stack([g.e_score_correction_bias for g in trainer.gates])
    assert torch.equal(metrics.loads, total)
    assert torch.allclose(after - before, bias_delta(total, 0.01))
    # applied per micro-batch, the rule would have given something else
    assert not torch.allclose(after - before, bias_delta(per_micro[0], 0.01) + bias_delta(per_micro[1], 0.01))


def test_train_step_counts_every_micro_batch_and_the_mtp_layers() -> None:
    cfg = load_config("tiny", ["train.steps=2", "train.bias_update_speed=0.01"])
    trainer = LocalTrainer(cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (4, 9))
    micro = [(ids[:2, :-1], ids[:2, 1:]), (ids[2:, :-1], ids[2:, 1:])]
    metrics = trainer.train_step(micro)
    n_moe = cfg.model.num_moe_layers + cfg.model.num_nextn_predict_layers
    assert metrics.loads.shape == (n_moe, cfg.model.n_routed_experts)
    # every token of both micro-batches, K experts each, in every MoE layer incl. the MTP module's
    assert torch.equal(metrics.loads.sum(dim=1), torch.full((n_moe,), 4 * 8 * cfg.model.num_experts_per_tok * 1.0))
    # the biases moved by exactly gamma·sign(mean − load)
    expected = bias_delta(metrics.loads, 0.01)
    got = torch.stack([g.e_score_correction_bias for g in trainer.gates])
    assert torch.allclose(got, expected)
    # biases are buffers: no gradient, not in the optimizer
    params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(g.e_score_correction_bias) not in params for g in trainer.gates)


def test_gamma_schedule() -> None:
    assert gamma_at(0, 10, 0.001, None) == 0.001
    assert gamma_at(9, 10, 0.001, 0.0) == 0.0
    assert abs(gamma_at(5, 11, 0.001, 0.0) - 0.0005) < 1e-12


def test_sequence_balance_loss_is_alpha_for_perfect_balance() -> None:
    # uniform affinities and uniform routing: f_i = 1 and P_i = 1/E, so L = alpha
    B, S, E, K = 2, 8, 8, 2
    scores = torch.full((B, S, E), 0.5)
    idx = torch.arange(S * K).remainder(E).view(1, S, K).expand(B, S, K)
    loss = sequence_balance_loss(scores, idx, alpha=0.0001)
    assert torch.allclose(loss, torch.tensor(0.0001))
    # all tokens on expert 0 with affinity mass on it: larger loss
    skew_scores = torch.full((B, S, E), 0.01)
    skew_scores[..., 0] = 0.99
    skew_idx = torch.zeros(B, S, K, dtype=torch.long)
    skew_idx[..., 1] = 1
    assert sequence_balance_loss(skew_scores, skew_idx, 0.0001) > 3 * loss


def test_seq_aux_loss_reaches_the_total_loss() -> None:
    cfg = load_config("tiny", ["train.seq_aux_alpha=0.5"])
    trainer = LocalTrainer(cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 9))
    m = trainer.train_step([(ids[:, :-1], ids[:, 1:])])
    assert m.aux_loss is not None and m.aux_loss > 0
    assert abs(m.loss - (m.main_loss + cfg.train.mtp_lambda * m.mtp_loss + m.aux_loss)) < 1e-4
    assert all(isinstance(x, MoE) for x in trainer.model.moe_layers())


def test_router_state_stays_float32_when_the_model_is_cast() -> None:
    cfg = load_config("tiny")
    trainer = LocalTrainer(cfg)
    model = trainer.model.to(torch.bfloat16)
    for moe in model.moe_layers():
        assert moe.gate.weight.dtype == torch.float32
        assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_loads_are_counted_in_training_and_evaluation_only() -> None:
    cfg = load_config("tiny")
    trainer = LocalTrainer(cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 9))
    trainer.model.eval()
    with torch.no_grad():
        trainer.model(ids)  # inference: no hooks, nothing counted, the biases do not move
    before = trainer.biases()
    loss, vio = trainer.evaluate([(ids[:, :-1], ids[:, 1:])])
    assert torch.equal(trainer.biases(), before)  # evaluation measures the balance, it does not update it
    assert loss > 0 and vio.shape == (cfg.model.num_moe_layers,)
    assert (vio > 0).all()
