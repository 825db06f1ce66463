"""The model against transformers' DeepseekV3ForCausalLM, and absorbed MLA against naive MLA."""

from __future__ import annotations

import pytest
import torch

from raymoe.platform.config import RopeScalingConfig
from raymoe.platform.model import DeepseekV3

from conftest import tiny_variant
from hf_reference import hf_model

HF_ATOL = 1e-4
ABSORBED_ATOL = 1e-5

VARIANTS = {
    "group-limited": {},
    "no-group-limit": {"n_group": 1, "topk_group": 1},
    "all-groups": {"topk_group": 4},
    "no-shared": {"n_shared_experts": 0},
    "two-shared-no-dense": {"n_shared_experts": 2, "first_k_dense_replace": 0},
    "all-dense": {"first_k_dense_replace": 3},
    "no-q-lora": {"q_lora_rank": None},
    "unnormalized-topk": {"norm_topk_prob": False, "routed_scaling_factor": 1.0},
    "rope-half": {"rope_interleave": False},
    "yarn": {
        "max_position_embeddings": 256,
        "rope_scaling": RopeScalingConfig(factor=4.0, original_max_position_embeddings=64),
    },
}


def ours_from_hf(cfg, hf) -> DeepseekV3:
    model = DeepseekV3(cfg).eval()
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
    assert not missing
    assert all(".shared_experts." in k for k in unexpected)  # zero-size tensors when n_shared_experts=0
    return model


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_equal_transformers(name: str) -> None:
    cfg = tiny_variant(num_nextn_predict_layers=0, **VARIANTS[name])
    hf = hf_model(cfg, seed=1)
    ours = ours_from_hf(cfg, hf)
    for batch, length in ((1, 1), (2, 19), (3, 70)):
        ids = torch.randint(0, cfg.vocab_size, (batch, length))
        with torch.no_grad():
            expected = hf(ids).logits
            got = ours(ids)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= HF_ATOL, name


def test_bias_changes_logits_like_transformers() -> None:
    # a large bias on one expert forces it into every token's choice, in both implementations
    cfg = tiny_variant(num_nextn_predict_layers=0)
    hf = hf_model(cfg, seed=2)
    with torch.no_grad():
        hf.model.layers[1].mlp.gate.e_score_correction_bias[5] = 10.0
    ours = ours_from_hf(cfg, hf)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= HF_ATOL


@pytest.mark.parametrize("yarn", [False, True])
def test_absorbed_equals_naive_prefill_and_decode(yarn: bool) -> None:
    extra = {
        "max_position_embeddings": 128,
        "rope_scaling": RopeScalingConfig(factor=8.0, original_max_position_embeddings=16),
    }
    cfg = tiny_variant(**(extra if yarn else {}))
    model = DeepseekV3(cfg).double().eval()
    model.init_weights(torch.Generator().manual_seed(3))
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        reference = model(ids)  # naive, no cache
        # prefill through the absorbed path
        cache = model.new_cache(2, 40)
        absorbed = model(ids, cache=cache, absorbed=True)
        assert (absorbed - reference).abs().max().item() <= ABSORBED_ATOL
        # prefill 25 tokens (naive), then decode the rest one token at a time (absorbed)
        cache = model.new_cache(2, 40)
        steps = [model(ids[:, :25], cache=cache)]
        for t in range(25, 40):
            steps.append(model(ids[:, t : t + 1], cache=cache))
        assert cache.length == 40
        assert (torch.cat(steps, dim=1) - reference).abs().max().item() <= ABSORBED_ATOL
        # a chunk of several tokens on a warm cache (absorbed, causal within the chunk)
        cache = model.new_cache(2, 40)
        model(ids[:, :10], cache=cache)
        chunk = model(ids[:, 10:40], cache=cache)
        assert (chunk - reference[:, 10:]).abs().max().item() <= ABSORBED_ATOL


def test_absorbed_equals_naive_float32() -> None:
    cfg = tiny_variant()
    model = DeepseekV3(cfg).eval()
    model.init_weights(torch.Generator().manual_seed(4))
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        reference = model(ids)
        cache = model.new_cache(1, 16)
        model(ids[:, :8], cache=cache)
        out = torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(8, 16)], dim=1)
    assert (out - reference[:, 8:]).abs().max().item() <= ABSORBED_ATOL


def test_cache_holds_latent_only() -> None:
    cfg = tiny_variant()
    model = DeepseekV3(cfg)
    cache = model.new_cache(1, 10)
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * model.num_cache_layers * 4
    assert cache.bytes_per_token == per_token


def test_position_limit_is_an_error() -> None:
    cfg = tiny_variant(max_position_embeddings=32)
    model = DeepseekV3(cfg)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_mtp_loss_predicts_the_token_after_next() -> None:
    # recompute module 1's loss by hand on the S-1 positions that have a target: position i
    # combines h_i with Emb(t_{i+1}) and predicts t_{i+2}
    cfg = tiny_variant(num_nextn_predict_layers=1)
    model = DeepseekV3(cfg)
    model.init_weights(torch.Generator().manual_seed(5))
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    labels = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model.loss(ids, labels, mtp_lambda=0.3)
    with torch.no_grad():
        h, _ = model.hidden(ids)
        module = model.model.mtp[0]
        cos, sin = model.positions(0, 15, ids.device)
        x = module.combine(h[:, :15], model.model.embed_tokens(labels[:, :15]))
        h1, _ = module(x, cos, sin)
        logits = model.lm_head(module.shared_head.norm(h1))
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
    assert torch.allclose(out.mtp_loss, expected, atol=1e-6)
    assert torch.allclose(out.loss, out.main_loss + 0.3 * out.mtp_loss)
    assert out.tokens == labels.numel()
    assert model.loss(ids, labels, mtp_lambda=0.0).mtp_loss is None  # lambda 0: MTP not run


def test_expert_paths_agree() -> None:
    # the sorted loop (fp32), the grouped GEMM (bf16 autocast) and the one-token decode path
    # against a per-token reference
    from raymoe.platform.model import Experts

    experts = Experts(8, 64, 32)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(37, 64)
    idx = torch.stack([torch.randperm(8)[:3] for _ in range(37)])
    idx[:, 0] = 0  # expert 0 busy; some experts may get no token
    w = torch.rand(37, 3)
    reference = torch.zeros_like(x)
    for n in range(37):
        for k in range(3):
            gate, up = (x[n] @ experts.gate_up_proj[idx[n, k]].T).chunk(2)
            reference[n] += w[n, k] * ((torch.nn.functional.silu(gate) * up) @ experts.down_proj[idx[n, k]].T)
    assert (experts(x, idx, w) - reference).abs().max() < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grouped = experts(x, idx, w)
    assert ((grouped.float() - reference).norm() / reference.norm()) < 2e-2  # bf16 rounding
    with torch.no_grad():
        assert (experts(x[5:6], idx[5:6], w[5:6]) - reference[5:6]).abs().max() < 1e-5
