"""The Hugging Face checkpoint adapter: transformers interop, round trips, FP8, validation, atomic saves."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from raymoe.platform.checkpoint import (
    FP8_E4M3_MAX,
    CheckpointError,
    dequantize_fp8_activation,
    dequantize_fp8_blockwise,
    hf_save,
    load_hf_checkpoint,
    load_hf_checkpoint_into,
    load_state_dict_from_hf,
    quantize_fp8_activation,
    quantize_fp8_blockwise,
    save_hf_checkpoint,
)
from raymoe.platform.checkpoint import hf as hf_ckpt
from raymoe.platform.config import ModelConfig, model_config_to_hf
from raymoe.platform.model import DeepseekV3

from conftest import tiny_variant
from hf_reference import hf_model
from hf_reference import save_hf_checkpoint as save_with_transformers

INDEX = "model.safetensors.index.json"
LOGITS_ATOL = 1e-4  # fp32, same weights, different op order
SMALL_SHARD_BYTES = 100_000  # the tiny model (~1 MB) is written in ~15 shards
# e4m3 keeps 3 mantissa bits: round-to-nearest is within 2^-4 relative of a normal value; below
# 2^-6 (subnormal) values are spaced 2^-9 apart, so the error is within 2^-10 in scaled units.
E4M3_REL_ERR = 2.0**-4
E4M3_SUBNORMAL_ABS_ERR = 2.0**-10
# dequantization multiplies a 4-bit e4m3 significand by a float32 scale: one float32 rounding
FP32_PRODUCT_REL_ERR = 2.0**-23


def _random_model(cfg: ModelConfig, seed: int = 0) -> DeepseekV3:
    """A model with every tensor random: norms away from 1, gate biases nonzero."""
    torch.manual_seed(seed)
    model = DeepseekV3(cfg)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model.eval()


def _ids(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def _index(ckpt: Path) -> dict:
    return json.loads((ckpt / INDEX).read_text())


def _edit_shard(ckpt: Path, file: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(ckpt / file)
    edit(tensors)
    save_file(tensors, ckpt / file, metadata={"format": "pt"})


def _edit_index(ckpt: Path, edit: Callable[[dict[str, str]], None]) -> None:
    index = _index(ckpt)
    edit(index["weight_map"])
    (ckpt / INDEX).write_text(json.dumps(index))


# --------------------------------------------------------------------------- transformers -> raymoe


@pytest.mark.parametrize("n_shared_experts", [0, 2])
def test_transformers_checkpoint_loads_with_equal_logits(tmp_path: Path, n_shared_experts: int) -> None:
    cfg = tiny_variant(num_nextn_predict_layers=0, n_shared_experts=n_shared_experts, n_group=1, topk_group=1)
    reference = save_with_transformers(cfg, tmp_path, max_shard_size="200KB")
    assert len(set(_index(tmp_path)["weight_map"].values())) > 1  # sharded
    if n_shared_experts == 0:  # transformers writes empty shared experts; they must be ignored
        assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in _index(tmp_path)["weight_map"]

    model = load_hf_checkpoint(tmp_path)

    reference_state = reference.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference_state[key]), key
    with torch.no_grad():
        expected = reference(_ids(cfg)).logits
        got = model(_ids(cfg))
    assert (got - expected).abs().max() <= LOGITS_ATOL


def test_transformers_fused_expert_names_load(tmp_path: Path) -> None:
    """A state dict in transformers' in-memory layout (stacked experts, empty shared experts) loads."""
    cfg = tiny_variant(num_nextn_predict_layers=0, n_shared_experts=0)
    reference = hf_model(cfg, seed=3)
    state = reference.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(model_config_to_hf(cfg)))

    model = load_hf_checkpoint(tmp_path)

    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_missing_mtp_modules_raise_unless_not_strict(tmp_path: Path) -> None:
    """transformers drops the MTP modules its config declares; strict loading says so."""
    cfg = tiny_variant(n_group=1, topk_group=1)  # num_nextn_predict_layers=1
    reference = save_with_transformers(cfg, tmp_path)
    with pytest.raises(CheckpointError, match="strict_mtp=False") as err:
        load_hf_checkpoint(tmp_path)
    assert f"model.layers.{cfg.num_hidden_layers}.*" in str(err.value) and INDEX in str(err.value)

    model = load_hf_checkpoint(tmp_path, strict_mtp=False)

    assert len(model.model.mtp) == 0 and model.cfg.num_nextn_predict_layers == 0
    with torch.no_grad():
        assert (model(_ids(cfg)) - reference(_ids(cfg)).logits).abs().max() <= LOGITS_ATOL


# --------------------------------------------------------------------------- raymoe -> raymoe / transformers


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    cfg = tiny_variant()  # MTP on, shared experts, group-limited routing
    model = _random_model(cfg)
    ckpt = save_hf_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=SMALL_SHARD_BYTES)

    weight_map = _index(ckpt)["weight_map"]
    assert len(set(weight_map.values())) > 1
    mtp = f"model.layers.{cfg.num_hidden_layers}"
    names = ["model.layers.1.mlp.experts.7.up_proj.weight", f"{mtp}.eh_proj.weight", f"{mtp}.enorm.weight"]
    names += [f"{mtp}.mlp.experts.0.down_proj.weight", f"{mtp}.embed_tokens.weight", f"{mtp}.shared_head.head.weight"]
    for name in names:
        assert name in weight_map, name
    assert not any(".mtp." in name or "gate_up_proj" in name for name in weight_map)
    up = load_file(ckpt / weight_map[names[0]])[names[0]]
    assert torch.equal(up, model.model.layers[1].mlp.experts.gate_up_proj[7, cfg.moe_intermediate_size :])
    head = load_file(ckpt / weight_map[names[-1]])[names[-1]]
    assert torch.equal(head, model.lm_head.weight)

    loaded = load_hf_checkpoint(ckpt)

    original, state = model.state_dict(), loaded.state_dict()
    assert original.keys() == state.keys()
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    for key in original:
        assert state[key].dtype == original[key].dtype and torch.equal(state[key], original[key]), key
    ids = _ids(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
        assert torch.equal(loaded.loss(ids, ids).mtp_loss, model.loss(ids, ids).mtp_loss)

    into = _random_model(cfg, seed=5)
    load_hf_checkpoint_into(into, ckpt)
    for key, value in into.state_dict().items():
        assert torch.equal(value, original[key]), key

    layer1 = load_state_dict_from_hf(ckpt, select=lambda key: key.startswith("model.layers.1."))
    assert layer1 and all(key.startswith("model.layers.1.") for key in layer1)
    assert all(torch.equal(value, original[key]) for key, value in layer1.items())


def test_single_file_and_bf16_save(tmp_path: Path) -> None:
    cfg = tiny_variant()
    model = _random_model(cfg)
    ckpt = save_hf_checkpoint(model, tmp_path / "ckpt", dtype=torch.bfloat16)
    assert not (ckpt / INDEX).exists()
    tensors = load_file(ckpt / "model.safetensors")
    assert tensors["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32  # as DeepSeek's
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"

    loaded = load_hf_checkpoint(ckpt, dtype=torch.bfloat16)

    for key, value in model.state_dict().items():
        want = value if "e_score_correction_bias" in key else value.to(torch.bfloat16)
        assert torch.equal(loaded.state_dict()[key], want), key


def test_transformers_loads_our_checkpoint(tmp_path: Path) -> None:
    from transformers import DeepseekV3ForCausalLM

    cfg = tiny_variant()
    model = _random_model(cfg)
    ckpt = save_hf_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=SMALL_SHARD_BYTES)

    reference, info = DeepseekV3ForCausalLM.from_pretrained(ckpt, output_loading_info=True)

    assert not info["missing_keys"] and not info["mismatched_keys"]
    mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
    assert info["unexpected_keys"] and all(k.startswith(mtp_prefix) for k in info["unexpected_keys"])
    with torch.no_grad():
        assert (reference.eval()(_ids(cfg)).logits - model(_ids(cfg))).abs().max() <= LOGITS_ATOL


# --------------------------------------------------------------------------- FP8


def _blockwise_magnitudes(rows: int, cols: int, block: int = 128) -> torch.Tensor:
    """Random [rows, cols] whose blocks differ in scale by powers of 10, so a misplaced scale shows."""
    w = torch.randn(rows, cols, dtype=torch.float64)
    for bi in range(0, rows, block):
        for bj in range(0, cols, block):
            w[bi : bi + block, bj : bj + block] *= 10.0 ** ((bi // block + 2 * (bj // block)) % 5 - 2)
    return w.float()


def _expanded(scale: torch.Tensor, shape: tuple[int, int], block: int = 128) -> torch.Tensor:
    return scale.double().repeat_interleave(block, 0)[: shape[0]].repeat_interleave(block, 1)[:, : shape[1]]


def _assert_e4m3_close(deq: torch.Tensor, w: torch.Tensor, scale_full: torch.Tensor) -> None:
    bound = E4M3_REL_ERR * w.double().abs() + E4M3_SUBNORMAL_ABS_ERR * scale_full
    assert ((deq.double() - w.double()).abs() <= bound * (1 + 1e-5)).all()


@pytest.mark.parametrize("shape", [(200, 72), (300, 260), (128, 128), (1, 3)])
def test_fp8_blockwise_quantization(shape: tuple[int, int]) -> None:
    w = _blockwise_magnitudes(*shape)
    w_fp8, scale_inv = quantize_fp8_blockwise(w)

    assert w_fp8.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32
    assert scale_inv.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    block_max = w_fp8.float().abs().view(-1).new_zeros(scale_inv.shape)
    for bi in range(scale_inv.shape[0]):
        for bj in range(scale_inv.shape[1]):
            block_max[bi, bj] = w_fp8.float()[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128].abs().max()
    assert torch.equal(block_max, torch.full_like(block_max, FP8_E4M3_MAX))  # each block's max maps to 448
    deq = dequantize_fp8_blockwise(w_fp8, scale_inv)
    reference = w_fp8.double() * _expanded(scale_inv, shape)  # float64 dequantization
    assert torch.allclose(deq.double(), reference, rtol=FP32_PRODUCT_REL_ERR, atol=0)
    _assert_e4m3_close(deq, w, _expanded(scale_inv, shape))


def test_fp8_zero_block_and_activation_groups() -> None:
    w_fp8, scale_inv = quantize_fp8_blockwise(torch.zeros(130, 5))
    assert torch.isfinite(scale_inv).all() and not dequantize_fp8_blockwise(w_fp8, scale_inv).any()

    x = torch.randn(3, 5, 200) * torch.logspace(-3, 3, 200)  # groups of very different magnitude
    x_fp8, scale = quantize_fp8_activation(x)
    assert scale.shape == (3, 5, 2)
    assert torch.equal(scale[..., 0], x[..., :128].abs().amax(-1) / FP8_E4M3_MAX)
    assert torch.equal(scale[..., 1], x[..., 128:].abs().amax(-1) / FP8_E4M3_MAX)
    full = scale.double().repeat_interleave(128, -1)[..., :200]
    _assert_e4m3_close(dequantize_fp8_activation(x_fp8, scale), x, full)


def _to_fp8_checkpoint(ckpt: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Quantize every 2-D projection of a saved checkpoint in place, like DeepSeek's FP8 release.

    One scale is moved to another shard to check that scales are found across files.
    Returns {name: (w_fp8, scale_inv)}.
    """
    quantized = {}
    weight_map = _index(ckpt)["weight_map"]
    for file in sorted(set(weight_map.values())):

        def quantize(tensors: dict[str, torch.Tensor]) -> None:
            for name in list(tensors):
                if "layers." in name and name.endswith("_proj.weight") and tensors[name].dim() == 2:
                    tensors[name], tensors[name + "_scale_inv"] = quantized[name] = quantize_fp8_blockwise(
                        tensors[name]
                    )

        _edit_shard(ckpt, file, quantize)
    moved = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
    files = sorted(set(weight_map.values()))
    target = next(f for f in files if f != weight_map["model.layers.0.self_attn.q_a_proj.weight"])
    _edit_shard(ckpt, weight_map["model.layers.0.self_attn.q_a_proj.weight"], lambda t: t.pop(moved))
    _edit_shard(ckpt, target, lambda t: t.update({moved: quantized["model.layers.0.self_attn.q_a_proj.weight"][1]}))

    def index_scales(wm: dict[str, str]) -> None:
        wm.update({name + "_scale_inv": wm[name] for name in quantized})
        wm[moved] = target

    _edit_index(ckpt, index_scales)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}  # fmt: skip
    (ckpt / "config.json").write_text(json.dumps(config))
    return quantized


def test_fp8_checkpoint_is_dequantized_on_load(tmp_path: Path) -> None:
    # dims that are not multiples of 128: q_a_proj [136, 200], mlp.gate_proj [300, 200], experts [72, 200]
    cfg = tiny_variant(hidden_size=200, intermediate_size=300, moe_intermediate_size=72, q_lora_rank=136)
    model = _random_model(cfg)
    ckpt = save_hf_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=400_000)
    quantized = _to_fp8_checkpoint(ckpt)
    assert quantize_fp8_blockwise(torch.zeros(300, 200))[1].shape == (3, 2)

    loaded = load_hf_checkpoint(ckpt)

    state, original = loaded.state_dict(), model.state_dict()
    reference = {name: w.double() * _expanded(s, tuple(w.shape)) for name, (w, s) in quantized.items()}
    checked = 0
    for key in state:
        name = hf_ckpt.checkpoint_name(key, cfg.num_hidden_layers)
        if name.endswith("gate_up_proj"):
            i = cfg.moe_intermediate_size
            prefix = name.removesuffix("gate_up_proj")
            pieces = [((e, slice(0, i)), f"{prefix}{e}.gate_proj.weight") for e in range(cfg.n_routed_experts)]
            pieces += [((e, slice(i, 2 * i)), f"{prefix}{e}.up_proj.weight") for e in range(cfg.n_routed_experts)]
        elif name.endswith("experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            pieces = [((e,), f"{prefix}{e}.down_proj.weight") for e in range(cfg.n_routed_experts)]
        else:
            pieces = [((), name)]
        for index, src in pieces:
            if src in reference:
                got = state[key][index]
                assert torch.allclose(got.double(), reference[src], rtol=FP32_PRODUCT_REL_ERR, atol=0), src
                _assert_e4m3_close(got, original[key][index], _expanded(quantized[src][1], tuple(got.shape)))
                checked += 1
            else:  # norms, embeddings, gate, lm_head stay as they were
                assert torch.equal(state[key][index], original[key][index]), src
    assert checked == len(quantized)


def test_fp8_weight_without_scale_is_rejected(tmp_path: Path) -> None:
    ckpt = save_hf_checkpoint(_random_model(tiny_variant()), tmp_path / "ckpt", max_shard_bytes=SMALL_SHARD_BYTES)
    _to_fp8_checkpoint(ckpt)
    name = "model.layers.2.self_attn.o_proj.weight"
    file = _index(ckpt)["weight_map"][name + "_scale_inv"]
    _edit_shard(ckpt, file, lambda t: t.pop(name + "_scale_inv"))
    _edit_index(ckpt, lambda wm: wm.pop(name + "_scale_inv"))

    with pytest.raises(CheckpointError, match=f"{name}.*{_index(ckpt)['weight_map'][name]}"):
        load_hf_checkpoint(ckpt)


# --------------------------------------------------------------------------- validation


def _drop(name: str, from_index: bool) -> Callable[[Path], str]:
    def corrupt(ckpt: Path) -> str:
        file = _index(ckpt)["weight_map"][name]
        _edit_shard(ckpt, file, lambda t: t.pop(name))
        if from_index:
            _edit_index(ckpt, lambda wm: wm.pop(name))
            return INDEX
        return file

    return corrupt


def _add_extra(ckpt: Path) -> str:
    name = "model.layers.1.mlp.experts.8.gate_proj.weight"  # the tiny config has experts 0..7
    file = _index(ckpt)["weight_map"]["model.layers.1.mlp.experts.7.gate_proj.weight"]
    _edit_shard(ckpt, file, lambda t: t.update({name: torch.zeros(32, 64)}))
    _edit_index(ckpt, lambda wm: wm.update({name: file}))
    return file


def _reshape(ckpt: Path) -> str:
    name = "model.layers.3.eh_proj.weight"  # MTP module 0: [hidden, 2 hidden] = [64, 128]
    file = _index(ckpt)["weight_map"][name]
    _edit_shard(ckpt, file, lambda t: t.update({name: torch.zeros(64, 127)}))
    return file


def _truncate(ckpt: Path) -> str:
    file = _index(ckpt)["weight_map"]["lm_head.weight"]
    data = (ckpt / file).read_bytes()
    (ckpt / file).write_bytes(data[: len(data) - 100])
    return file


MISSING = "model.layers.2.mlp.experts.5.up_proj.weight"
MISSING_BUT_INDEXED = "model.layers.1.self_attn.kv_b_proj.weight"
CORRUPTIONS = {  # case -> (corrupt the checkpoint and return the file to name, tensor to name)
    "missing": (_drop(MISSING, from_index=True), MISSING),
    "missing_but_indexed": (_drop(MISSING_BUT_INDEXED, from_index=False), MISSING_BUT_INDEXED),
    "extra": (_add_extra, "model.layers.1.mlp.experts.8.gate_proj.weight"),
    "wrong_shape": (_reshape, "model.layers.3.eh_proj.weight"),
    "corrupt_file": (_truncate, None),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_bad_checkpoint_is_rejected_before_loading(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_variant()
    ckpt = save_hf_checkpoint(_random_model(cfg), tmp_path / "ckpt", max_shard_bytes=SMALL_SHARD_BYTES)
    corrupt, tensor = CORRUPTIONS[case]
    file = corrupt(ckpt)
    target = _random_model(cfg, seed=7)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint_into(target, ckpt)
    for k, v in target.state_dict().items():  # nothing was copied into the model
        assert torch.equal(v, before[k]), k

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensors were allocated or copied before validation failed")

    monkeypatch.setattr(hf_ckpt, "_allocate", must_not_run)
    monkeypatch.setattr(hf_ckpt, "_copy", must_not_run)
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(ckpt)
    assert file in str(err.value)
    if tensor is not None:
        assert tensor in str(err.value)
    if case == "wrong_shape":
        assert "[64, 127]" in str(err.value) and "[64, 128]" in str(err.value)


def test_unreadable_config_is_a_checkpoint_error(tmp_path: Path) -> None:
    ckpt = save_hf_checkpoint(_random_model(tiny_variant()), tmp_path / "ckpt")
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nowhere")


# --------------------------------------------------------------------------- atomic save


def test_save_is_atomic_and_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_variant()
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": "bpe"}')
    first, second = _random_model(cfg, seed=1), _random_model(cfg, seed=2)
    path = tmp_path / "out" / "ckpt"
    save_hf_checkpoint(first, path, max_shard_bytes=SMALL_SHARD_BYTES, extra_files=[tokenizer])
    assert sorted(os.listdir(path.parent)) == ["ckpt"]  # no temporary directory left
    assert (path / "tokenizer.json").read_text() == tokenizer.read_text()
    (path / "stale.txt").write_text("from an older checkpoint")

    save_hf_checkpoint(second, path)  # one shard this time: the old shards and index must go

    assert sorted(os.listdir(path.parent)) == ["ckpt"]
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert torch.equal(load_hf_checkpoint(path).lm_head.weight, second.lm_head.weight)

    calls = []

    def crash_on_second_shard(tensors: dict, filename: object, metadata: object = None) -> None:
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf_save, "save_file", crash_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(first, path, max_shard_bytes=SMALL_SHARD_BYTES)
    assert sorted(os.listdir(path.parent)) == ["ckpt"]  # the partial write is gone
    assert torch.equal(load_hf_checkpoint(path).lm_head.weight, second.lm_head.weight)  # the old one intact
