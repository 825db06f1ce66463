"""Generation on the serving engine in one process, against transformers and against full recomputation."""

from __future__ import annotations

import pytest
import torch

from raymoe.platform.config import ModelConfig, RopeScalingConfig
from raymoe.platform.inference.engine import generate
from raymoe.platform.inference.sampling import SamplingParams, choose
from raymoe.platform.model import DeepseekV3, Gate
from raymoe.platform.model.transformer import prepare_for_inference

from conftest import greedy_by_recompute, tiny_variant
from hf_reference import hf_model

# weights large enough that attention (and so RoPE/YaRN and the cache) changes the argmax
INIT_STD = 0.1
PROMPT_LEN = 7
NEW_TOKENS = 10
YARN = RopeScalingConfig(factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0)


def _ours(cfg: ModelConfig, seed: int = 0) -> DeepseekV3:
    """Our model with random weights and random nonzero gate biases, in eval mode."""
    torch.manual_seed(seed)
    model = DeepseekV3(cfg).eval()
    model.init_weights()
    with torch.no_grad():
        for gate in model.gates():
            gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def _prompts(cfg: ModelConfig, batch: int = 2, length: int = PROMPT_LEN, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=gen).tolist()


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
    prompt = torch.tensor(_prompts(cfg))
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, eos_token_id=None, pad_token_id=0,
    )[:, PROMPT_LEN:].tolist()  # fmt: skip
    assert generate(ours, prompt.tolist(), NEW_TOKENS) == expected


@pytest.mark.parametrize("speculative", [False, True])
def test_greedy_equals_full_recompute_with_mtp_layers(speculative: bool) -> None:
    cfg = tiny_variant(initializer_range=INIT_STD)
    model = _ours(cfg)
    prompts = _prompts(cfg, batch=3)
    assert generate(model, prompts, NEW_TOKENS, speculative=speculative) == greedy_by_recompute(
        model, prompts, NEW_TOKENS
    )


def test_ragged_prompts_match_one_by_one() -> None:
    cfg = tiny_variant(initializer_range=INIT_STD)
    model = _ours(cfg)
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11], [300, 2, 1]]
    batched = generate(model, prompts, 6)
    assert batched == [generate(model, [p], 6)[0] for p in prompts]
    assert batched == [greedy_by_recompute(model, [p], 6)[0] for p in prompts]


def test_generation_does_not_change_the_model() -> None:
    cfg = tiny_variant(initializer_range=INIT_STD)
    model = _ours(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generate(model, _prompts(cfg), 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the gate biases included


def test_seeded_sampling_is_reproducible_and_tiny_top_p_is_greedy() -> None:
    cfg = tiny_variant(initializer_range=INIT_STD)
    model = _ours(cfg)
    prompts = _prompts(cfg)
    kwargs = {"temperature": 1.5, "top_p": 0.9}
    first = generate(model, prompts, NEW_TOKENS, seed=123, **kwargs)
    assert generate(model, prompts, NEW_TOKENS, seed=123, **kwargs) == first
    assert generate(model, prompts, NEW_TOKENS, seed=124, **kwargs) != first
    greedy = generate(model, prompts, NEW_TOKENS)
    assert generate(model, prompts, NEW_TOKENS, temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    nucleus = SamplingParams(temperature=1.0, top_p=0.8)
    assert {choose(logits, nucleus, gen) for _ in range(200)} == {0, 1}  # 0.5 + 0.3 reaches 0.8: 2 and 3 cut
    everything = SamplingParams(temperature=1.0, top_p=1.0)
    assert {choose(logits, everything, gen) for _ in range(400)} == {0, 1, 2, 3}


def test_eos_stops_each_sequence_and_the_batch_goes_on() -> None:
    cfg = tiny_variant(initializer_range=INIT_STD)
    model = _ours(cfg)
    prompts = _prompts(cfg)
    free = generate(model, prompts, NEW_TOKENS)
    eos = free[0][2]  # the third token of sequence 0
    assert eos not in free[1][: NEW_TOKENS - 1], "pick prompts where sequence 1 does not stop as early"
    stopped = generate(model, prompts, NEW_TOKENS, eos_token_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    cut = free[1].index(eos) + 1 if eos in free[1] else NEW_TOKENS
    assert stopped[1] == free[1][:cut]


def test_position_limit_is_an_error_naming_it() -> None:
    cfg = tiny_variant(max_position_embeddings=16)
    model = _ours(cfg)
    with pytest.raises(ValueError, match="context of 16 tokens"):
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
    prompts = _prompts(cfg)
    with torch.no_grad():
        logits, ref_logits = model(torch.tensor(prompts)), ref(torch.tensor(prompts))
    assert logits.dtype == torch.float32
    assert (logits - ref_logits).abs().max() < 0.1 * ref_logits.abs().max()
    out = generate(model, prompts, NEW_TOKENS)
    assert [len(seq) for seq in out] == [NEW_TOKENS, NEW_TOKENS]
    # the bf16 paged-cache decode of the first new token agrees with bf16 recomputation to bf16 precision
    from raymoe.platform.inference.batch import SeqRun, build_step
    from raymoe.platform.inference.runner import LocalRunner

    runner = LocalRunner(model, num_blocks=5, block_size=8)
    assert runner.cache.kv.dtype == torch.bfloat16
    first = build_step([SeqRun(p, 0, [1 + 2 * b, 2 + 2 * b]) for b, p in enumerate(prompts)], 8)
    runner.main(first, first.last_rows())
    step = build_step([SeqRun([seq[0]], PROMPT_LEN, [1 + 2 * b, 2 + 2 * b]) for b, seq in enumerate(out)], 8)
    cached, _ = runner.main(step, torch.arange(2))
    with torch.no_grad():
        full = model(torch.tensor([p + [seq[0]] for p, seq in zip(prompts, out)]))[:, -1]
    assert (cached - full).abs().max() < 0.05 * full.abs().max()
