"""Generation with the latent cache against transformers and against full recomputation."""

from __future__ import annotations

import pytest
import torch

from raymoe.platform.config import ModelConfig, RopeScalingConfig
from raymoe.platform.generate import generate, prepare_for_inference, sample, stream_generate
from raymoe.platform.model import DeepseekV3, Gate

from conftest import tiny_variant
from hf_reference import hf_model

# weights large enough that attention (and so RoPE/YaRN and the cache) changes the argmax
INIT_STD = 0.1
PROMPT_LEN = 7
NEW_TOKENS = 10
DECODE_ATOL = 1e-5
YARN = RopeScalingConfig(factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0)


def _ours(cfg: ModelConfig, seed: int = 0) -> DeepseekV3:
    """Our model with random weights and random nonzero gate biases, in eval mode."""
    torch.manual_seed(seed)
    model = DeepseekV3(cfg).eval()
    model.init_weights()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def _prompts(cfg: ModelConfig, batch: int = 2, length: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _greedy_by_recompute(model: DeepseekV3, prompt: torch.Tensor, n: int) -> list[list[int]]:
    """Greedy decoding without a cache: the whole sequence through the naive path every step."""
    seq = prompt
    for _ in range(n):
        seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return seq[:, prompt.shape[1] :].tolist()


HF_CONFIGS = {
    "tiny": {},
    "yarn": {"rope_scaling": YARN, "max_position_embeddings": 1024},
    "no_q_lora_all_moe": {"q_lora_rank": None, "first_k_dense_replace": 0},
    "ungrouped_routing": {"n_group": 1, "topk_group": 1, "num_experts_per_tok": 3},
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_greedy_equals_transformers_generate(name: str) -> None:
    cfg = tiny_variant(num_nextn_predict_layers=0, initializer_range=INIT_STD, **HF_CONFIGS[name])
    hf = hf_model(cfg)
    ours = DeepseekV3(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    prompt = _prompts(cfg)
    expected = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[:, PROMPT_LEN:].tolist()
    assert generate(ours, prompt, NEW_TOKENS) == expected
    # list input and the streaming variant give the same tokens
    assert generate(ours, prompt.tolist(), NEW_TOKENS) == expected
    steps = list(stream_generate(ours, prompt, NEW_TOKENS))
    assert [list(seq) for seq in zip(*steps)] == expected


def test_greedy_equals_full_recompute_with_mtp_layers(tiny_cfg: ModelConfig) -> None:
    cfg = tiny_variant(initializer_range=INIT_STD)
    model = _ours(cfg)
    prompt = _prompts(cfg, batch=3)
    assert generate(model, prompt, NEW_TOKENS) == _greedy_by_recompute(model, prompt, NEW_TOKENS)


@pytest.mark.parametrize("name", ["tiny", "yarn"])
@torch.no_grad()
def test_cached_decode_logits_equal_full_recompute(name: str) -> None:
    cfg = tiny_variant(initializer_range=INIT_STD, **HF_CONFIGS[name])
    model = _ours(cfg)
    prompt = _prompts(cfg)
    cache = model.new_cache(prompt.shape[0], PROMPT_LEN + NEW_TOKENS)
    logits = model(prompt, cache=cache, last_only=True)[:, -1]
    torch.testing.assert_close(logits, model(prompt)[:, -1], atol=DECODE_ATOL, rtol=0)
    seq = prompt
    for step in range(NEW_TOKENS):
        token = logits.argmax(-1, keepdim=True)  # [B, 1]
        seq = torch.cat((seq, token), dim=1)
        logits = model(token, cache=cache)[:, -1]  # absorbed path over the latent cache
        assert cache.length == PROMPT_LEN + step + 1
        torch.testing.assert_close(logits, model(seq)[:, -1], atol=DECODE_ATOL, rtol=0)


def test_ragged_prompts_match_one_by_one() -> None:
    cfg = tiny_variant(initializer_range=INIT_STD)
    model = _ours(cfg)
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11], [300, 2, 1]]
    batched = generate(model, prompts, 6)
    assert batched == [generate(model, [p], 6)[0] for p in prompts]


def test_generation_leaves_expert_load_counters_alone() -> None:
    cfg = tiny_variant(initializer_range=INIT_STD)
    model = _ours(cfg)
    generate(model, _prompts(cfg), 4)
    assert all(float(moe.tokens_per_expert.sum()) == 0 for moe in model.moe_layers())
    assert all(moe.count_loads is None for moe in model.moe_layers())  # restored to the default


def test_seeded_sampling_is_reproducible_and_tiny_top_p_is_greedy() -> None:
    cfg = tiny_variant(initializer_range=INIT_STD)
    model = _ours(cfg)
    prompt = _prompts(cfg)
    kwargs = {"temperature": 1.5, "top_p": 0.9}
    first = generate(model, prompt, NEW_TOKENS, seed=123, **kwargs)
    assert generate(model, prompt, NEW_TOKENS, seed=123, **kwargs) == first
    assert generate(model, prompt, NEW_TOKENS, seed=124, **kwargs) != first
    greedy = generate(model, prompt, NEW_TOKENS)
    assert generate(model, prompt, NEW_TOKENS, temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, 1.0, top_p=0.8, generator=gen)) for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are cut
    drawn = {int(sample(logits, 1.0, top_p=1.0, generator=gen)) for _ in range(400)}
    assert drawn == {0, 1, 2, 3}


def test_eos_stops_each_sequence_and_the_batch_goes_on() -> None:
    cfg = tiny_variant(initializer_range=INIT_STD)
    model = _ours(cfg)
    prompt = _prompts(cfg)
    free = generate(model, prompt, NEW_TOKENS)
    eos = free[0][2]  # the third token of sequence 0
    assert eos not in free[1][: NEW_TOKENS - 1], "pick prompts where sequence 1 does not stop as early"
    stopped = generate(model, prompt, NEW_TOKENS, eos_token_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    cut = free[1].index(eos) + 1 if eos in free[1] else NEW_TOKENS
    assert stopped[1] == free[1][:cut]
    steps = list(stream_generate(model, prompt, NEW_TOKENS, eos_token_id=eos))
    assert [s[0] for s in steps[: len(stopped[0])]] == stopped[0]
    assert all(s[0] is None for s in steps[len(stopped[0]) :])


def test_position_limit_is_an_error_naming_it() -> None:
    cfg = tiny_variant(max_position_embeddings=16)
    model = _ours(cfg)
    with pytest.raises(ValueError, match=r"max_position_embeddings \(16\)"):
        generate(model, [[1] * 10], max_new_tokens=7)
    assert len(generate(model, [[1] * 10], max_new_tokens=6)[0]) == 6


@pytest.mark.parametrize(
    ("prompts", "kwargs", "match"),
    [
        ([[1, 512]], {}, "outside the vocabulary"),
        ([[]], {}, "empty"),
        ([[1]], {"top_p": 0.0}, "top_p"),
        ([[1]], {"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_arguments_are_value_errors(prompts: list[list[int]], kwargs: dict, match: str) -> None:
    model = _ours(tiny_variant())
    with pytest.raises(ValueError, match=match):
        generate(model, prompts, 3, **kwargs)


def test_bf16_keeps_gates_in_float32_and_tracks_float32() -> None:
    cfg = tiny_variant(initializer_range=INIT_STD)
    ref = _ours(cfg)
    model = prepare_for_inference(_ours(cfg), torch.bfloat16)
    for name, param in model.named_parameters():
        expected = torch.float32 if name.endswith(".mlp.gate.weight") else torch.bfloat16
        assert param.dtype == expected, name
    for module in model.modules():
        if isinstance(module, Gate):
            assert module.weight.dtype == module.e_score_correction_bias.dtype == torch.float32
    assert model.model.rotary_emb.cos.dtype == torch.float32
    prompt = _prompts(cfg)
    with torch.no_grad():
        logits, ref_logits = model(prompt), ref(prompt)
    assert logits.dtype == torch.float32
    assert (logits - ref_logits).abs().max() < 0.1 * ref_logits.abs().max()
    out = generate(model, prompt, NEW_TOKENS)
    assert [len(seq) for seq in out] == [NEW_TOKENS, NEW_TOKENS]
    # the bf16 cache decode agrees with bf16 recomputation to bf16 precision
    with torch.no_grad():
        cache = model.new_cache(2, PROMPT_LEN + 1)
        model(prompt, cache=cache)
        token = torch.tensor([[out[0][0]], [out[1][0]]])
        cached = model(token, cache=cache)[:, -1]
        full = model(torch.cat((prompt, token), dim=1))[:, -1]
    assert cache.c_kv.dtype == torch.bfloat16
    assert (cached - full).abs().max() < 0.05 * full.abs().max()


def test_stream_generate_checks_arguments_when_called() -> None:
    model = _ours(tiny_variant(max_position_embeddings=16))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        stream_generate(model, [[1] * 10], 7)  # raised before any step is taken
    with pytest.raises(ValueError, match="one length"):
        stream_generate(model, [[1, 2], [3]], 2)
