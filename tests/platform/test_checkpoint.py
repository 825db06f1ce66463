"""Checkpoints: Hugging Face interop (transformers both ways, FP8, validation, atomic saves) and the one
training layout every trainer writes (names, round trips, complete or invisible, the latest wins, export)."""

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
    HFCheckpoint,
    TrainingCheckpoint,
    checkpoint_name,
    dequantize_fp8_activation,
    dequantize_fp8_blockwise,
    export_hf,
    hf_save,
    latest_checkpoint,
    load_into,
    load_model,
    open_checkpoint,
    quantize_fp8_activation,
    quantize_fp8_blockwise,
    resolve,
    save_hf_checkpoint,
    tensorfile,
)
from raymoe.platform.checkpoint.layout import (
    CHECKPOINTS_DIR,
    COLOCATED_FILE,
    CONFIG_FILE,
    FORMAT,
    HF_INDEX_FILE,
    HF_SINGLE_FILE,
    SHARDS_FILE,
    STATE_FILE,
    TOKENIZER_FILE,
    split_experts,
    stack_experts,
)
from raymoe.platform.config import ModelConfig, config_to_dict, load_config, model_config_to_hf
from raymoe.platform.model import DeepseekV3
from raymoe.platform.train.trainer import LocalTrainer

from conftest import tiny_variant
from hf_reference import hf_model
from hf_reference import save_hf_checkpoint as save_with_transformers

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
    model = DeepseekV3(cfg)
    model.init_weights(seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0.0, 0.1, generator=g)
    return model.eval()


def _ids(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def _index(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / HF_INDEX_FILE).read_text())


def _edit_shard(ckpt: Path, file: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(Path(ckpt) / file)
    edit(tensors)
    save_file(tensors, Path(ckpt) / file, metadata={"format": "pt"})


def _edit_index(ckpt: Path, edit: Callable[[dict[str, str]], None]) -> None:
    index = _index(ckpt)
    edit(index["weight_map"])
    (Path(ckpt) / HF_INDEX_FILE).write_text(json.dumps(index))


def _assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def _forbid_data_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, reading any tensor's data (not a header) fails the test: validation must come first."""

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensor data was read before the checkpoint was validated")

    monkeypatch.setattr(tensorfile.TensorFile, "read", must_not_run)


# --------------------------------------------------------------------------- transformers -> raymoe


@pytest.mark.parametrize("n_shared_experts", [0, 2])
def test_transformers_checkpoint_loads_with_equal_logits(tmp_path: Path, n_shared_experts: int) -> None:
    cfg = tiny_variant(num_nextn_predict_layers=0, n_shared_experts=n_shared_experts, n_group=1, topk_group=1)
    reference = save_with_transformers(cfg, tmp_path, max_shard_size="200KB")
    assert len(set(_index(tmp_path)["weight_map"].values())) > 1  # sharded
    if n_shared_experts == 0:  # transformers writes empty shared experts; they must be ignored
        assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in _index(tmp_path)["weight_map"]

    reader = open_checkpoint(str(tmp_path))
    model = load_model(reader)

    assert isinstance(reader, HFCheckpoint) and reader.state is None and reader.model_config == cfg
    want = reference.state_dict()
    assert all(want[k].numel() == 0 for k in want.keys() - model.state_dict().keys())  # the empty shared experts
    _assert_same_state(model.state_dict(), {k: want[k] for k in model.state_dict()})
    with torch.no_grad():
        expected = reference(_ids(cfg)).logits
        got = model(_ids(cfg))
    assert (got - expected).abs().max() <= LOGITS_ATOL


def test_transformers_stacked_expert_names_load(tmp_path: Path) -> None:
    """A state dict in transformers' in-memory layout (stacked experts, empty shared experts) loads row by row."""
    cfg = tiny_variant(num_nextn_predict_layers=0, n_shared_experts=0)
    reference = hf_model(cfg, seed=3)
    state = reference.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / HF_SINGLE_FILE, metadata={"format": "pt"})
    (tmp_path / CONFIG_FILE).write_text(json.dumps(model_config_to_hf(cfg)))

    reader = HFCheckpoint(str(tmp_path))
    model = load_model(reader)

    assert reader.headers["model.layers.1.mlp.experts.gate_up_proj"].shape[0] == cfg.n_routed_experts
    one = reader.read(["model.layers.2.mlp.experts.5.down_proj"])["model.layers.2.mlp.experts.5.down_proj"]
    assert torch.equal(one, state["model.layers.2.mlp.experts.down_proj"][5])
    assert all(state[k].numel() == 0 for k in state.keys() - model.state_dict().keys())
    _assert_same_state(model.state_dict(), {k: state[k] for k in model.state_dict()})


def test_missing_mtp_modules_raise_unless_not_strict(tmp_path: Path) -> None:
    """transformers drops the MTP modules its config declares; strict loading says so."""
    cfg = tiny_variant(n_group=1, topk_group=1)  # num_nextn_predict_layers=1
    reference = save_with_transformers(cfg, tmp_path)
    with pytest.raises(CheckpointError, match="strict_mtp=False") as err:
        HFCheckpoint(str(tmp_path))
    assert f"model.layers.{cfg.num_hidden_layers}.*" in str(err.value) and HF_INDEX_FILE in str(err.value)
    with pytest.raises(CheckpointError, match="strict_mtp=False"):
        open_checkpoint(str(tmp_path), strict_mtp=True)

    model = load_model(open_checkpoint(str(tmp_path)))  # strict_mtp=False: what serving and generate open

    assert len(model.model.mtp) == 0 and model.cfg.num_nextn_predict_layers == 0
    with torch.no_grad():
        assert (model(_ids(cfg)) - reference(_ids(cfg)).logits).abs().max() <= LOGITS_ATOL


# --------------------------------------------------------------------------- raymoe -> raymoe / transformers


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    cfg = tiny_variant()  # MTP on, shared experts, group-limited routing
    model = _random_model(cfg)
    ckpt = Path(save_hf_checkpoint(model, str(tmp_path / "ckpt"), max_shard_bytes=SMALL_SHARD_BYTES))

    weight_map = _index(ckpt)["weight_map"]
    assert len(set(weight_map.values())) > 1
    mtp = f"model.layers.{cfg.num_hidden_layers}"
    names = ["model.layers.1.mlp.experts.7.up_proj.weight", f"{mtp}.eh_proj.weight", f"{mtp}.enorm.weight"]
    names += [f"{mtp}.mlp.experts.0.down_proj.weight", f"{mtp}.embed_tokens.weight", f"{mtp}.shared_head.head.weight"]
    for name in names:
        assert name in weight_map, name
    assert not any(".mtp." in name or "gate_up_proj" in name for name in weight_map)
    up = load_file(ckpt / weight_map[names[0]])[names[0]]
    assert torch.equal(up, model.model.layers["1"].mlp.experts.gate_up_proj[7, cfg.moe_intermediate_size :])
    head = load_file(ckpt / weight_map[names[-1]])[names[-1]]
    assert torch.equal(head, model.lm_head.weight)

    loaded = load_model(str(ckpt))

    original = model.state_dict()
    _assert_same_state(loaded.state_dict(), original)
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    ids = _ids(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
        assert torch.equal(loaded.loss(ids, ids).mtp_loss, model.loss(ids, ids).mtp_loss)

    into = _random_model(cfg, seed=5)
    assert load_into(dict(into.state_dict()), open_checkpoint(str(ckpt))) == set()
    _assert_same_state(into.state_dict(), original)

    # a part of the model (an attention stage: layer 1, no routed experts), and an expert shard's rows
    part = load_model(str(ckpt), layers=(1, 2), routed_experts=False)
    assert part.state_dict() and all(torch.equal(v, original[k]) for k, v in part.state_dict().items())
    assert not any(".experts." in k for k in part.state_dict())
    stacked = "model.layers.1.mlp.experts.gate_up_proj"
    share = {stacked: torch.empty(2, *original[stacked].shape[1:])}
    load_into(share, open_checkpoint(str(ckpt)), expert_ids={stacked: [5, 2]})
    assert torch.equal(share[stacked], original[stacked][[5, 2]])


def test_single_file_and_bf16_save(tmp_path: Path) -> None:
    cfg = tiny_variant()
    model = _random_model(cfg)
    ckpt = Path(save_hf_checkpoint(model, str(tmp_path / "ckpt"), dtype=torch.bfloat16))
    assert not (ckpt / HF_INDEX_FILE).exists()
    tensors = load_file(ckpt / HF_SINGLE_FILE)
    assert tensors["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32  # as DeepSeek's
    assert json.loads((ckpt / CONFIG_FILE).read_text())["dtype"] == "bfloat16"

    loaded = load_model(str(ckpt), dtype=torch.bfloat16).state_dict()

    for key, value in model.state_dict().items():
        router = key.endswith("mlp.gate.weight")  # routers stay float32, holding the file's bf16 values
        bias = "e_score_correction_bias" in key
        want = value if bias else value.to(torch.bfloat16).to(torch.float32 if router else torch.bfloat16)
        assert loaded[key].dtype == want.dtype and torch.equal(loaded[key], want), key


def test_transformers_loads_our_checkpoint(tmp_path: Path) -> None:
    from transformers import DeepseekV3ForCausalLM

    cfg = tiny_variant()
    model = _random_model(cfg)
    ckpt = save_hf_checkpoint(model, str(tmp_path / "ckpt"), max_shard_bytes=SMALL_SHARD_BYTES)

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
    config = json.loads((ckpt / CONFIG_FILE).read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (ckpt / CONFIG_FILE).write_text(json.dumps(config))
    return quantized


def test_fp8_checkpoint_is_dequantized_on_load(tmp_path: Path) -> None:
    # dims that are not multiples of 128: q_a_proj [136, 200], mlp.gate_proj [300, 200], experts [72, 200]
    cfg = tiny_variant(hidden_size=200, intermediate_size=300, moe_intermediate_size=72, q_lora_rank=136)
    model = _random_model(cfg)
    ckpt = Path(save_hf_checkpoint(model, str(tmp_path / "ckpt"), max_shard_bytes=400_000))
    quantized = _to_fp8_checkpoint(ckpt)
    assert quantize_fp8_blockwise(torch.zeros(300, 200))[1].shape == (3, 2)

    loaded = load_model(str(ckpt))

    state, original = loaded.state_dict(), model.state_dict()
    reference = {name: w.double() * _expanded(s, tuple(w.shape)) for name, (w, s) in quantized.items()}
    checked = 0
    for key in state:
        name = checkpoint_name(key, cfg.num_hidden_layers)
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


def test_fp8_weight_without_scale_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _random_model(tiny_variant())
    ckpt = Path(save_hf_checkpoint(model, str(tmp_path / "ckpt"), max_shard_bytes=SMALL_SHARD_BYTES))
    _to_fp8_checkpoint(ckpt)
    name = "model.layers.2.self_attn.o_proj.weight"
    file = _index(ckpt)["weight_map"][name + "_scale_inv"]
    _edit_shard(ckpt, file, lambda t: t.pop(name + "_scale_inv"))
    _edit_index(ckpt, lambda wm: wm.pop(name + "_scale_inv"))
    _forbid_data_reads(monkeypatch)

    with pytest.raises(CheckpointError, match=f"{name} in {_index(ckpt)['weight_map'][name]}.*_scale_inv"):
        open_checkpoint(str(ckpt))


# --------------------------------------------------------------------------- validation


def _drop(name: str, from_index: bool) -> Callable[[Path], str]:
    def corrupt(ckpt: Path) -> str:
        file = _index(ckpt)["weight_map"][name]
        _edit_shard(ckpt, file, lambda t: t.pop(name))
        if from_index:
            _edit_index(ckpt, lambda wm: wm.pop(name))
            return HF_INDEX_FILE
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


def _retype(ckpt: Path) -> str:
    name = "model.layers.0.self_attn.kv_a_layernorm.weight"
    file = _index(ckpt)["weight_map"][name]
    _edit_shard(ckpt, file, lambda t: t.update({name: torch.zeros(t[name].shape, dtype=torch.int32)}))
    return file


def _truncate(ckpt: Path) -> str:
    file = _index(ckpt)["weight_map"]["lm_head.weight"]
    data = (ckpt / file).read_bytes()
    (ckpt / file).write_bytes(data[: len(data) - 100])
    return file


def _delete_shard(ckpt: Path) -> str:
    file = _index(ckpt)["weight_map"]["lm_head.weight"]
    (ckpt / file).unlink()
    return file


MISSING = "model.layers.2.mlp.experts.5.up_proj.weight"
MISSING_BUT_INDEXED = "model.layers.1.self_attn.kv_b_proj.weight"
CORRUPTIONS = {  # case -> (corrupt the checkpoint and return the file to name, tensor to name)
    "missing": (_drop(MISSING, from_index=True), MISSING),
    "missing_but_indexed": (_drop(MISSING_BUT_INDEXED, from_index=False), MISSING_BUT_INDEXED),
    "extra": (_add_extra, "model.layers.1.mlp.experts.8.gate_proj.weight"),
    "wrong_shape": (_reshape, "model.layers.3.eh_proj.weight"),
    "wrong_dtype": (_retype, "model.layers.0.self_attn.kv_a_layernorm.weight"),
    "corrupt_file": (_truncate, None),
    "missing_file": (_delete_shard, None),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_bad_checkpoint_is_rejected_before_any_data_is_read(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_variant()
    ckpt = Path(save_hf_checkpoint(_random_model(cfg), str(tmp_path / "ckpt"), max_shard_bytes=SMALL_SHARD_BYTES))
    corrupt, tensor = CORRUPTIONS[case]
    file = corrupt(ckpt)
    _forbid_data_reads(monkeypatch)
    for open_it in (lambda: open_checkpoint(str(ckpt)), lambda: load_model(str(ckpt))):
        with pytest.raises(CheckpointError) as err:
            open_it()
        assert file in str(err.value)
        if tensor is not None:
            assert tensor in str(err.value)
    if case == "wrong_shape":
        assert "[64, 127]" in str(err.value) and "[64, 128]" in str(err.value)


def test_every_problem_is_listed_in_one_error(tmp_path: Path) -> None:
    ckpt = Path(
        save_hf_checkpoint(_random_model(tiny_variant()), str(tmp_path / "ckpt"), max_shard_bytes=SMALL_SHARD_BYTES)
    )
    reshaped_in = _reshape(ckpt)
    _drop(MISSING, from_index=True)(ckpt)
    extra_in = _add_extra(ckpt)

    with pytest.raises(CheckpointError, match="does not match the model") as err:
        HFCheckpoint(str(ckpt))

    message = str(err.value)
    assert "(3 problems)" in message  # a reshaped tensor is one problem, not also an unexpected one
    assert f"model.layers.3.eh_proj.weight in {reshaped_in}" in message
    assert f"{MISSING} [32, 64] is missing" in message
    assert f"model.layers.1.mlp.experts.8.gate_proj.weight [32, 64] in {extra_in}" in message


def test_unreadable_config_is_a_checkpoint_error(tmp_path: Path) -> None:
    ckpt = Path(save_hf_checkpoint(_random_model(tiny_variant()), str(tmp_path / "ckpt")))
    (ckpt / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        open_checkpoint(str(ckpt))
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="is not a checkpoint: neither a training checkpoint"):
        open_checkpoint(str(tmp_path))


# --------------------------------------------------------------------------- atomic HF save


def test_save_is_atomic_and_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_variant()
    tokenizer = tmp_path / TOKENIZER_FILE
    tokenizer.write_text('{"model": "bpe"}')
    first, second = _random_model(cfg, seed=1), _random_model(cfg, seed=2)
    path = tmp_path / "out" / "ckpt"
    save_hf_checkpoint(first, str(path), max_shard_bytes=SMALL_SHARD_BYTES, extra_files=[str(tokenizer)])
    assert sorted(os.listdir(path.parent)) == ["ckpt"]  # no temporary directory left
    assert (path / TOKENIZER_FILE).read_text() == tokenizer.read_text()
    (path / "stale.txt").write_text("from an older checkpoint")

    save_hf_checkpoint(second, str(path))  # one shard this time: the old shards and index must go

    assert sorted(os.listdir(path.parent)) == ["ckpt"]
    assert sorted(os.listdir(path)) == [CONFIG_FILE, "generation_config.json", HF_SINGLE_FILE]
    assert torch.equal(load_model(str(path)).lm_head.weight, second.lm_head.weight)

    calls = []
    write_tensors = hf_save.write_tensors

    def crash_on_second_shard(location: str, tensors: dict, metadata: object = None) -> list[str]:
        calls.append(location)
        if len(calls) == 2:
            raise OSError("disk full")
        return write_tensors(location, tensors, metadata=metadata)

    monkeypatch.setattr(hf_save, "write_tensors", crash_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(first, str(path), max_shard_bytes=SMALL_SHARD_BYTES)
    assert len(calls) == 2
    assert sorted(os.listdir(path.parent)) == ["ckpt"]  # the partial write is gone
    assert torch.equal(load_model(str(path)).lm_head.weight, second.lm_head.weight)  # the old one intact


# --------------------------------------------------------------------------- the training layout


def _train_cfg(*overrides: str):
    return load_config("tiny", ["tracking.enabled=false", *overrides])


def _micro_batches(seed: int, n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` micro-batches of 2 random sequences of the tiny preset's 32 tokens."""
    rows = torch.randint(0, 512, (2 * n, 33), generator=torch.Generator().manual_seed(seed))
    return list(zip(rows[:, :-1].chunk(n), rows[:, 1:].chunk(n)))


def _save(trainer: LocalTrainer, root: Path, extra: list | None = None) -> str:
    state = {"loader": {"epoch": 0, "position": trainer.step * 4}, "config": config_to_dict(trainer.cfg)}
    return trainer.save_checkpoint(str(root), state, extra)


def test_the_local_trainer_writes_the_training_layout(tmp_path: Path) -> None:
    cfg = _train_cfg()
    trainer = LocalTrainer(cfg)
    trainer.train_step(_micro_batches(0))
    tokenizer = tmp_path / TOKENIZER_FILE
    tokenizer.write_text('{"model": "bpe"}')

    path = _save(trainer, tmp_path / "run", [str(tokenizer)])

    assert path == str(tmp_path / "run" / CHECKPOINTS_DIR / "step_00000001")
    assert os.listdir(tmp_path / "run" / CHECKPOINTS_DIR) == ["step_00000001"]  # no temporary left behind
    assert sorted(os.listdir(path)) == sorted([COLOCATED_FILE, SHARDS_FILE, STATE_FILE, CONFIG_FILE, TOKENIZER_FILE])
    state = json.loads(Path(path, STATE_FILE).read_text())
    assert (state["format"], state["trainer"], state["step"]) == (FORMAT, "local", 1)
    assert state["parallel"] == {"dp": 1, "pp": 1, "ep": 1}
    assert state["loader"] == {"epoch": 0, "position": 4} and state["config"] == config_to_dict(cfg)
    assert torch.equal(torch.tensor(state["biases"]), trainer.biases()) and trainer.biases().abs().sum() > 0
    assert {"torch"} <= state["rng"].keys()
    assert json.loads(Path(path, CONFIG_FILE).read_text()) == model_config_to_hf(cfg.model)
    weight_map = json.loads(Path(path, SHARDS_FILE).read_text())["weight_map"]
    assert set(weight_map.values()) == {COLOCATED_FILE}
    expert, stacked = "model.layers.1.mlp.experts.3.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj"
    assert expert in weight_map and stacked not in weight_map
    assert f"optimizer.{expert}.exp_avg_sq" in weight_map and "optimizer.lm_head.weight.step" in weight_map

    reader = open_checkpoint(str(tmp_path / "run"))  # a training output: its latest checkpoint

    assert isinstance(reader, TrainingCheckpoint) and reader.location == path and reader.state["step"] == 1
    m = cfg.model
    assert reader.model_config == m and reader.info(expert).shape == (2 * m.moe_intermediate_size, m.hidden_size)
    assert torch.equal(reader.read([expert])[expert], trainer.model.model.layers["1"].mlp.experts.gate_up_proj[3])
    _assert_same_state(reader.read(reader.names()), trainer.state_tensors())
    with pytest.raises(CheckpointError, match=f"{path} has no tensor model.layers.1.mlp.experts.8.gate_up_proj"):
        reader.read(["model.layers.1.mlp.experts.8.gate_up_proj"])


def test_save_and_load_round_trip_with_the_optimizer_and_rng(tmp_path: Path) -> None:
    cfg = _train_cfg()
    trainer = LocalTrainer(cfg)
    for seed in range(2):
        trainer.train_step(_micro_batches(seed))
    rng_at_save = torch.get_rng_state()
    path = _save(trainer, tmp_path)
    saved = {k: v.clone() for k, v in trainer.state_tensors().items()}
    next_loss = trainer.train_step(_micro_batches(2)).loss

    other = LocalTrainer(_train_cfg("train.seed=7"))  # other weights, no optimizer state yet
    torch.rand(100)  # move the RNG on
    state = other.load_checkpoint(path)

    assert state["step"] == other.step == 2 and torch.equal(torch.get_rng_state(), rng_at_save)
    _assert_same_state(other.state_tensors(), saved)
    assert torch.equal(other.biases(), torch.tensor(state["biases"]))
    assert other.train_step(_micro_batches(2)).loss == next_loss


def test_split_and_stack_experts_are_inverse() -> None:
    stacked = {
        "model.layers.1.mlp.experts.down_proj": torch.randn(3, 4, 2),
        "optimizer.model.layers.1.mlp.experts.down_proj.exp_avg": torch.randn(3, 4, 2),
        "optimizer.model.layers.1.mlp.experts.down_proj.step": torch.tensor(5.0),
        "model.norm.weight": torch.randn(4),
    }
    one_by_one = split_experts(stacked, {"model.layers.1.mlp.experts.down_proj": [4, 0, 7]})
    assert sorted(one_by_one) == sorted(
        ["model.norm.weight"]
        + [f"model.layers.1.mlp.experts.{e}.down_proj" for e in (4, 0, 7)]
        + [f"optimizer.model.layers.1.mlp.experts.{e}.down_proj.{k}" for e in (4, 0, 7) for k in ("exp_avg", "step")]
    )
    assert torch.equal(
        one_by_one["model.layers.1.mlp.experts.7.down_proj"], stacked["model.layers.1.mlp.experts.down_proj"][2]
    )
    back = stack_experts(one_by_one, {"model.layers.1.mlp.experts.down_proj": [4, 0, 7]})
    _assert_same_state(back, stacked)
    with pytest.raises(CheckpointError, match=r"experts.down_proj: experts \[1, 2\] are missing"):
        stack_experts(one_by_one, {"model.layers.1.mlp.experts.down_proj": [0, 1, 2]})


def test_bad_training_checkpoints_are_named_before_anything_is_copied(tmp_path: Path) -> None:
    trainer = LocalTrainer(_train_cfg())
    path = Path(_save(trainer, tmp_path))
    target = LocalTrainer(_train_cfg("train.seed=3"))
    before = target.state_tensors()
    index = json.loads((path / SHARDS_FILE).read_text())
    removed = "model.layers.2.mlp.experts.6.down_proj"
    del index["weight_map"][removed]
    (path / SHARDS_FILE).write_text(json.dumps(index))

    with pytest.raises(CheckpointError, match=f"checkpoint {path} has no tensor {removed}"):
        target.load_checkpoint(str(path))
    _assert_same_state(target.state_tensors(), before)

    # a tensor of the wrong shape: named with its file, from the headers, before anything is copied
    from raymoe.platform.checkpoint.tensorfile import TensorFile, write_tensors

    index["weight_map"][removed] = COLOCATED_FILE
    (path / SHARDS_FILE).write_text(json.dumps(index))
    part = TensorFile(str(path / COLOCATED_FILE))
    tensors = {k: v.clone() for k, v in part.read(list(part.tensors)).items()}
    tensors["model.norm.weight"] = torch.zeros(63)  # the model's is [64]
    write_tensors(str(path / COLOCATED_FILE), tensors)
    with pytest.raises(CheckpointError, match=rf"model.norm.weight in {COLOCATED_FILE} has shape \[63\]"):
        target.load_checkpoint(str(path))
    _assert_same_state(target.state_tensors(), before)

    data = (path / COLOCATED_FILE).read_bytes()
    (path / COLOCATED_FILE).write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=str(path / COLOCATED_FILE)):
        TrainingCheckpoint(str(path)).read(["model.norm.weight"])

    (path / SHARDS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{path} is not a checkpoint"):
        open_checkpoint(str(path))
    with pytest.raises(CheckpointError, match=SHARDS_FILE):
        TrainingCheckpoint(str(path))


def test_a_checkpoint_is_complete_or_invisible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from raymoe.platform.checkpoint import sharded

    trainer = LocalTrainer(_train_cfg())
    trainer.train_step(_micro_batches(0))
    first = _save(trainer, tmp_path)
    trainer.train_step(_micro_batches(1))
    checkpoints = tmp_path / CHECKPOINTS_DIR

    # a failure while the part is written, then one while the state (written last) is: nothing shows
    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    write_json = sharded.storage.write_json
    for target, name, fake in (
        (sharded, "write_tensors", crash),
        (sharded.storage, "write_json", lambda loc, obj: crash() if loc.endswith(STATE_FILE) else write_json(loc, obj)),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(target, name, fake)
            with pytest.raises(OSError, match="disk full"):
                _save(trainer, tmp_path)
        assert os.listdir(checkpoints) == ["step_00000001"]
        assert latest_checkpoint(str(tmp_path)) == first

    # a process killed while writing leaves its temporary folder: never a checkpoint, removed by the next save
    stale = checkpoints / ".tmp-step_00000002-deadbeef"
    stale.mkdir()
    (stale / STATE_FILE).write_text("{}")
    (stale / SHARDS_FILE).write_text("{}")
    assert latest_checkpoint(str(tmp_path)) == first and resolve(str(tmp_path)).location == first

    second = _save(trainer, tmp_path)

    assert sorted(os.listdir(checkpoints)) == ["step_00000001", "step_00000002"]
    assert latest_checkpoint(str(tmp_path)) == second


def test_the_latest_complete_checkpoint_wins(tmp_path: Path) -> None:
    trainer = LocalTrainer(_train_cfg())
    paths = []
    for seed in range(3):
        trainer.train_step(_micro_batches(seed))
        paths.append(_save(trainer, tmp_path))
    half_written = tmp_path / CHECKPOINTS_DIR / "step_00000009"  # on an object store: no state yet
    half_written.mkdir()
    (half_written / SHARDS_FILE).write_text("{}")

    assert latest_checkpoint(str(tmp_path)) == paths[-1] == str(tmp_path / CHECKPOINTS_DIR / "step_00000003")
    assert resolve(str(tmp_path)).location == paths[-1] and resolve(str(tmp_path)).kind == "training"
    assert open_checkpoint(str(tmp_path)).state["step"] == 3
    assert open_checkpoint(paths[0]).state["step"] == 1  # a checkpoint named itself is that one
    assert latest_checkpoint(str(tmp_path / "empty")) is None


def test_export_writes_a_checkpoint_transformers_loads(tmp_path: Path) -> None:
    from transformers import DeepseekV3ForCausalLM

    trainer = LocalTrainer(_train_cfg())
    trainer.train_step(_micro_batches(0))
    tokenizer = tmp_path / TOKENIZER_FILE
    tokenizer.write_text('{"model": "bpe"}')
    _save(trainer, tmp_path / "run", [str(tokenizer)])
    out = tmp_path / "hf"

    source = export_hf(str(tmp_path / "run"), str(out))

    assert source == latest_checkpoint(str(tmp_path / "run"))
    assert (out / TOKENIZER_FILE).read_text() == tokenizer.read_text()
    exported = HFCheckpoint(str(out))  # strict: the MTP module is there
    model = load_model(exported)
    _assert_same_state(model.state_dict(), trainer.model.state_dict())
    reference = DeepseekV3ForCausalLM.from_pretrained(out).eval()
    ids = _ids(trainer.cfg.model)
    with torch.no_grad():
        assert (reference(ids).logits - model(ids)).abs().max() <= LOGITS_ATOL
