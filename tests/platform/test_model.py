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


BLOCK = 4


def _paged_logits(model: DeepseekV3, ids: torch.Tensor, chunks: list[int], naive_min_run: int) -> torch.Tensor:
    """Logits [B, T, V] of ids [B, T] fed to the serving runner's paged cache in ``chunks`` of tokens.

    Each sequence's blocks are handed out in reverse order, so the block tables are not the identity."""
    from raymoe.platform.inference.batch import SeqRun, build_step
    from raymoe.platform.inference.runner import LocalRunner

    B, T = ids.shape
    per_seq = -(-T // BLOCK)
    runner = LocalRunner(model, B * per_seq + 1, BLOCK)
    blocks = [list(range(1 + b * per_seq, 1 + (b + 1) * per_seq))[::-1] for b in range(B)]
    outs, start = [], 0
    for n in chunks:
        runs = [SeqRun(ids[b, start : start + n].tolist(), start, blocks[b]) for b in range(B)]
        batch = build_step(runs, BLOCK, naive_min_run)
        logits, _ = runner.main(batch, torch.arange(batch.num_rows))
        outs.append(logits.view(B, n, -1))
        start += n
    return torch.cat(outs, dim=1)


NAIVE, ABSORBED = 1, 1 << 30  # naive_min_run: every run naive, or every run absorbed


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
        reference = model(ids)  # the training forward: naive, whole sequences, no cache
    # the whole prompt at once through the paged cache, by each path
    for path in (NAIVE, ABSORBED):
        assert (_paged_logits(model, ids, [40], path) - reference).abs().max().item() <= ABSORBED_ATOL
    # prefill 25 tokens (naive), then decode the rest one token at a time (absorbed)
    decoded = _paged_logits(model, ids, [25] + [1] * 15, naive_min_run=2)
    assert (decoded - reference).abs().max().item() <= ABSORBED_ATOL
    # a chunk of several tokens on a warm cache, causal within the chunk, by each path
    for path in (NAIVE, ABSORBED):
        chunked = _paged_logits(model, ids, [10, 30], path)
        assert (chunked - reference).abs().max().item() <= ABSORBED_ATOL


def test_absorbed_equals_naive_float32() -> None:
    cfg = tiny_variant()
    model = DeepseekV3(cfg).eval()
    model.init_weights(torch.Generator().manual_seed(4))
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        reference = model(ids)
    out = _paged_logits(model, ids, [8] + [1] * 8, naive_min_run=2)
    assert (out - reference).abs().max().item() <= ABSORBED_ATOL


def test_the_flop_crossover_of_naive_and_absorbed() -> None:
    from raymoe.platform.config import load_config
    from raymoe.platform.model.attention import naive_flop_crossover

    # S·(2C − dn − dv) > C·(dn + dv): 43 on the bench preset (C 128, dn = dv = 32), 171 on DeepSeek-V3
    assert naive_flop_crossover(load_config("bench").model) == 43
    assert naive_flop_crossover(load_config("deepseek-v3").model) == 171


def test_decode_and_draft_runs_stay_absorbed() -> None:
    """Decode tokens and a token with its MTP draft take the absorbed path (the paged decode kernel on CUDA)."""
    from raymoe.platform.inference.batch import SeqRun, build_step
    from raymoe.platform.model.attention import naive_min_run

    n = naive_min_run(tiny_variant())
    assert n > 2
    step = build_step([SeqRun([1], 5, [1, 2]), SeqRun([1, 2], 9, [3, 4]), SeqRun(list(range(n)), 0, [5, 6])], 8, n)
    assert step.absorbed_rows.tolist() == [0, 1, 2] and [run[:3] for run in step.naive_runs] == [(3, n, 0)]


def test_cache_holds_latent_only() -> None:
    from raymoe.platform.inference.runner import LocalRunner

    cfg = tiny_variant()
    model = DeepseekV3(cfg).eval()
    runner = LocalRunner(model, num_blocks=3, block_size=BLOCK)
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * model.num_cache_layers * 4
    assert runner.cache.bytes == 3 * BLOCK * per_token


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
    from raymoe.platform.model.attention import CausalAttention
    from raymoe.platform.model.forward import drive, head, local_experts, main_program, mtp_program

    with torch.no_grad():
        h = drive(main_program(model, CausalAttention.of(2, 16), tokens=ids.reshape(-1)), local_experts(model))
        h_prev = h.view(2, 16, -1)[:, :15].reshape(30, -1)
        module = model.mtp_modules()[0]
        emb = model.model.embed_tokens(labels[:, :15]).reshape(30, -1)
        h1 = drive(mtp_program(module, model, h_prev, emb, CausalAttention.of(2, 15)), local_experts(model))
        logits = head(model, h1, module.shared_head.norm)
        expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1))
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
        assert (experts(x[5:6], idx[5:6], w[5:6]) - reference[5:6]).abs().max() < 1e-5  # one token, no sort
        assert (experts._gathered(x, idx, w) - reference).abs().max() < 1e-5  # what torch.compile runs
    # an expert shard's buffer: choices of experts held elsewhere are -1 (and skipped)
    partial = idx.clone()
    partial[:, 2] = -1
    ref_partial = reference.clone()
    for n in range(37):
        gate, up = (x[n] @ experts.gate_up_proj[idx[n, 2]].T).chunk(2)
        ref_partial[n] -= w[n, 2] * ((torch.nn.functional.silu(gate) * up) @ experts.down_proj[idx[n, 2]].T)
    assert (experts(x, partial, w, partial=True) - ref_partial).abs().max() < 1e-5
    none_here = torch.full_like(idx, -1)
    assert torch.equal(experts(x, none_here, w, partial=True), torch.zeros_like(x))


@pytest.mark.parametrize("need", ["all", "weights", "input"])
def test_expert_loop_equals_autograd_through_each_expert_to_the_bit(need: str) -> None:
    """The float32 path's written-out backward (``_ExpertLoop``) against autograd through ``expert_ffn`` per
    expert: outputs and every gradient equal, with experts that get no rows (their gradients zeros)."""
    from raymoe.platform.model import moe

    torch.manual_seed(0)
    E, D, inter = 8, 64, 32
    x, grad = torch.randn(90, D), torch.randn(90, D)
    w13, w2 = torch.randn(E, 2 * inter, D) * 0.1, torch.randn(E, D, inter) * 0.1
    sizes = [20, 0, 11, 30, 0, 1, 28, 0]
    results = []
    for run in ("autograd", "loop"):
        leaves = [t.clone().requires_grad_(want) for t, want in zip((x, w13, w2), _needs(need))]
        if run == "autograd":
            blocks = [moe.expert_ffn(r, leaves[1][e], leaves[2][e]) for e, r in enumerate(leaves[0].split(sizes))]
            y = torch.cat([b for b, n in zip(blocks, sizes) if n])
        else:
            y = moe._ExpertLoop.apply(*leaves, sizes)
        y.backward(grad)
        results.append([y.detach()] + [t.grad for t in leaves])
    for name, a, b in zip(("out", "x", "gate_up", "down"), *results):
        assert (a is None) == (b is None), name
        assert a is None or torch.equal(a, b), name
    if results[1][2] is not None:
        assert not results[1][2][[1, 4, 7]].any()  # experts without rows
        for _ in range(3):  # again, into memory freed by earlier products (fresh pages would be zeros anyway)
            leaves = [t.clone().requires_grad_() for t in (x, w13, w2)]
            moe._ExpertLoop.apply(*leaves, sizes).backward(grad)
            assert not leaves[1].grad[[1, 4, 7]].any() and not leaves[2].grad[[1, 4, 7]].any()


def _needs(need: str) -> tuple[bool, bool, bool]:
    return {"all": (True, True, True), "weights": (False, True, True), "input": (True, False, False)}[need]


def test_cpu_grouped_experts_pad_row_blocks_without_changing_results(monkeypatch) -> None:  # noqa: ANN001
    """bf16 on the CPU: every expert's row block goes to grouped_mm rounded up to CPU_ROW_MULTIPLE rows (so
    GEMM shapes repeat across steps), gathered there from the rows cast first; outputs and gradients equal
    the unpadded pass (which gathers float32 rows, then casts) to the bit."""
    from raymoe.platform.model import moe

    torch.manual_seed(0)
    experts = moe.Experts(8, 64, 32)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(50, 64)
    idx, w = torch.randint(0, 8, (50, 2)), torch.rand(50, 2)
    seen = []
    real = moe.GROUPED_MM

    def spy(a, b, offs):  # noqa: ANN001, ANN202
        seen.append(offs.tolist())
        return real(a, b, offs=offs)

    monkeypatch.setattr(moe, "GROUPED_MM", spy)
    results = {}
    for multiple in (1, moe.CPU_ROW_MULTIPLE):
        monkeypatch.setattr(moe, "CPU_ROW_MULTIPLE", multiple)
        experts.zero_grad()
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = experts(xg, idx, w)
        y.float().pow(2).sum().backward()
        results[multiple] = [y.detach(), xg.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()]
    assert all(o % 64 == 0 for o in seen[-1]) and seen[-1][-1] > 100  # padded blocks (100 pairs unpadded)
    assert seen[0][-1] == 100
    for a, b in zip(results[1], results[moe.CPU_ROW_MULTIPLE]):  # the padding rows (copies of row 0) add nothing
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_linear_cross_entropy_equals_the_whole_logits(dtype: str, monkeypatch) -> None:  # noqa: ANN001
    """The chunked head loss against F.cross_entropy of the whole float32 logits: loss and both gradients,
    over several chunks and a ragged last one, with ignored rows; float32 to rounding, bf16 to its own."""
    import torch.nn.functional as F

    from raymoe.platform.model import forward

    monkeypatch.setattr(forward, "LOSS_CHUNK_ELEMENTS", 300 * 100)  # chunks of 100 rows over 257
    monkeypatch.setattr(forward, "LOSS_MIN_CHUNK_ROWS", 1)
    torch.manual_seed(0)
    x = torch.randn(257, 64)
    w = torch.randn(300, 64) * 0.1
    labels = torch.randint(0, 300, (257,))
    labels[::7] = forward.IGNORE_INDEX
    results = []
    for fused in (False, True):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            if fused:
                loss = forward.linear_cross_entropy(xg, wg, labels)
            else:
                loss = F.cross_entropy(F.linear(xg, wg).float(), labels, ignore_index=forward.IGNORE_INDEX)
        (loss * 3).backward()  # a weight on the loss reaches both gradients
        results.append((loss.detach(), xg.grad, wg.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for fused, plain in zip(results[1][1:], results[0][1:]):  # bf16: within 2 % of the gradient's largest entry
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == "fp32" else dict(rtol=0.0, atol=2e-2 * plain.abs().max().item())
        torch.testing.assert_close(fused, plain, **tol)
    assert results[1][1].dtype == x.dtype and results[1][2].dtype == w.dtype
    # no gradient wanted: the loss alone; every row ignored: NaN, as F.cross_entropy
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        torch.testing.assert_close(forward.linear_cross_entropy(x, w, labels), results[1][0], rtol=0, atol=0)
    assert forward.linear_cross_entropy(x, w, torch.full_like(labels, forward.IGNORE_INDEX)).isnan()


def test_training_loss_gives_predictions_only_to_hooks_that_want_them() -> None:
    """Hooks that want the predicted tokens (the routing recorder) get each row's argmax of the head's logits,
    main and MTP, and the loss is bit for bit the one without them."""
    from raymoe.platform.model.attention import CausalAttention
    from raymoe.platform.model.forward import Hooks, drive, head, local_experts, loss, main_program

    class Seen(Hooks):
        def __init__(self, wants: bool) -> None:
            self.wants_predictions, self.seen = wants, {}

        def predicted(self, depth: int, tokens: torch.Tensor) -> None:
            self.seen[depth] = tokens

    cfg = tiny_variant(num_nextn_predict_layers=1)
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    model.init_weights()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    outs, seen = {}, {}
    for wants in (False, True):
        seen[wants] = Seen(wants)
        outs[wants] = loss(model, ids, ids, mtp_lambda=0.3, hooks=seen[wants])
    assert seen[False].seen == {} and set(seen[True].seen) == {0, 1}
    assert torch.equal(outs[True].loss, outs[False].loss) and not outs[True].loss.isnan()
    with torch.no_grad():
        h = drive(main_program(model, CausalAttention.of(2, 12), tokens=ids.reshape(-1)), local_experts(model))
        assert torch.equal(seen[True].seen[0], head(model, h).argmax(-1))


def test_training_attention_takes_the_fused_kernel_and_equals_the_written_out_one() -> None:
    """Causal attention of whole sequences pads v to the query width so that SDPA runs its fused (flash)
    CPU kernel, not its math fallback; the output equals attention written out, in float32."""
    from torch.profiler import profile

    from raymoe.platform.model.attention import MLA

    cfg = tiny_variant()
    torch.manual_seed(0)
    mla = MLA(cfg, 0)
    B, S, H = 2, 9, cfg.num_attention_heads
    q_nope, q_pe = torch.randn(B, S, H, cfg.qk_nope_head_dim), torch.randn(B, S, H, cfg.qk_rope_head_dim)
    c_kv, k_pe = torch.randn(B, S, cfg.kv_lora_rank), torch.randn(B, S, cfg.qk_rope_head_dim)
    assert cfg.v_head_dim != cfg.qk_head_dim
    with profile() as prof:
        out = mla.naive(q_nope, q_pe, c_kv, k_pe)
    names = {e.key for e in prof.key_averages()}
    assert any("flash_attention" in n for n in names) and not any("attention_math" in n for n in names)
    with torch.no_grad():  # attention written out in float32
        kv = mla.kv_b_proj(c_kv).view(B, S, H, -1)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, S, H, cfg.qk_rope_head_dim)), dim=-1).transpose(1, 2)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * mla.softmax_scale
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        want = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["written-out", "compiled-blocked", "compiled-large"])
def test_written_out_attention_backward_equals_float64(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's training attention in a compiled region gives the output and the gradients of attention
    in float64: float32 to rounding, bf16 no further off than SDPA's own backward or transformers' eager
    attention (float32 softmax, bf16 probabilities) is (at most 2x the larger error, 2 % of the largest).

    Paths: ``_CausalAttention`` called directly (the fused forward, the backward written out); compiled,
    the blocked products (blocks of 16 query rows here, so S = 37 is three blocks, the last one short);
    compiled with scores above the blocked path's limit, which is ``_CausalAttention`` again."""
    from raymoe.platform.model import attention
    from raymoe.platform.model.attention import _CausalAttention, causal_attention

    monkeypatch.setattr(attention, "CAUSAL_BLOCK_ROWS", 16)
    if path == "compiled-large":
        monkeypatch.setattr(attention, "BLOCKED_SCORES_MAX_BYTES", 0)
    torch.manual_seed(0)
    B, H, S, dqk, dv = 2, 3, 37, 12, 8
    base = [torch.randn(B, H, S, d, dtype=torch.float64) * 1.5 for d in (dqk, dqk, dv)]
    grad_out = torch.randn(B, H, S, dv, dtype=torch.float64)
    scale = dqk**-0.5

    def grads(fn, dtype):  # noqa: ANN001, ANN202
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in base)
        out = fn(q, k, v)
        out.backward(grad_out.to(dtype))
        return [out.detach().double(), *(t.grad.double() for t in (q, k, v))]

    def reference(q, k, v):  # noqa: ANN001, ANN202 - transformers' eager attention in q's dtype
        scores = (q @ k.transpose(-1, -2)) * scale
        probs = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf")).float().softmax(-1)
        return probs.to(v.dtype) @ v

    def written_out(q, k, v):  # noqa: ANN001, ANN202
        return _CausalAttention.apply(q, k, v, scale)

    compiled = torch.compile(lambda q, k, v: causal_attention(q, k, v, scale), fullgraph=True)
    fn = written_out if path == "written-out" else compiled
    want = grads(reference, torch.float64)
    for got, ref in zip(grads(fn, torch.float32), want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    sdpa = grads(lambda q, k, v: causal_attention(q, k, v, scale), torch.bfloat16)  # eager: SDPA's own backward
    eager = grads(reference, torch.bfloat16)
    for got, theirs, hf, ref in zip(grads(fn, torch.bfloat16), sdpa, eager, want):
        err, theirs_err, hf_err = (((t - ref).abs().max() / ref.abs().max()).item() for t in (got, theirs, hf))
        their_err = max(theirs_err, hf_err)
        assert err <= max(2 * their_err, 1e-3) and err < 0.02, (err, their_err)
