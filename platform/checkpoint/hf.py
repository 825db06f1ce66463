"""Hugging Face / DeepSeek-V3 checkpoints: load them into raymoe's :class:`DeepseekV3`, save them from it.

A checkpoint is a directory: ``config.json``, ``model.safetensors.index.json`` and its shards (or a
single ``model.safetensors``), in DeepSeek-V3's layout (REFERENCE.md, "Checkpoint format"):

- routed experts one by one, ``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``, which
  load into the model's stacked ``experts.gate_up_proj`` [E, 2I, D] (gate rows, then up rows) and
  ``experts.down_proj`` [E, D, I]; transformers' stacked names are read as well;
- MTP module k (0-based) is layer ``num_hidden_layers + k``; it also stores copies of the shared
  ``embed_tokens`` and output head (``shared_head.head``), which are skipped on load and written
  on save;
- FP8 checkpoints (``quantization_config``): each e4m3 ``X.weight`` has a float32
  ``X.weight_scale_inv`` [⌈out/128⌉, ⌈in/128⌉] and is dequantized on load.

Loading checks every safetensors header (names, shapes, dtypes) against the model before it
allocates or copies anything, then reads one shard at a time, tensor by tensor. Nothing is
unpickled. Saving is in ``hf_save``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from raymoe.platform.checkpoint.fp8 import FP8_BLOCK, dequantize_fp8_blockwise, scale_shape
from raymoe.platform.config import ConfigError, ModelConfig, model_config_from_hf
from raymoe.platform.model.layers import RotaryEmbedding
from raymoe.platform.model.transformer import DeepseekV3

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # FP8 ``X.weight`` has its block scales in ``X.weight_scale_inv``
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_FP8_DTYPE = "F8_E4M3"
_GATE_UP = ".mlp.experts.gate_up_proj"
_DOWN = ".mlp.experts.down_proj"
_MAX_PROBLEMS_SHOWN = 20


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not match the model; the message names the tensor and file."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint as its safetensors header describes it (no data read)."""

    name: str
    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype: "F32", "BF16", "F8_E4M3", ...


@dataclasses.dataclass(frozen=True)
class _Piece:
    """Checkpoint tensor ``source`` goes to ``target[index]`` of our state-dict entry ``key``."""

    key: str
    index: tuple[Any, ...]  # () whole tensor, (e,) one expert, (e, slice) gate or up rows of one expert
    source: TensorInfo
    scale: TensorInfo | None  # FP8 block scales of ``source``


@dataclasses.dataclass
class _Plan:
    cfg: ModelConfig
    model: DeepseekV3  # on the meta device: names, shapes, parameter/buffer kinds
    pieces: list[_Piece]
    block: int


# --------------------------------------------------------------------------- names


def checkpoint_name(key: str, num_hidden_layers: int) -> str:
    """Our state-dict key -> the checkpoint's name: ``model.mtp.K.x`` is ``model.layers.{L+K}.x``."""
    if key.startswith("model.mtp."):
        k, rest = key[len("model.mtp.") :].split(".", 1)
        return f"model.layers.{num_hidden_layers + int(k)}.{rest}"
    return key


def _expert_pieces(name: str, shape: tuple[int, ...]) -> list[tuple[tuple[Any, ...], str, tuple[int, ...]]]:
    """(index, per-expert checkpoint name, shape) of a stacked expert tensor; [] when not one."""
    if name.endswith(_GATE_UP):
        prefix = name[: -len("gate_up_proj")]
        n_experts, two_i, hidden = shape
        i = two_i // 2
        return [
            piece
            for e in range(n_experts)
            for piece in (
                ((e, slice(0, i)), f"{prefix}{e}.gate_proj.weight", (i, hidden)),
                ((e, slice(i, two_i)), f"{prefix}{e}.up_proj.weight", (i, hidden)),
            )
        ]
    if name.endswith(_DOWN):
        prefix = name[: -len("down_proj")]
        n_experts, hidden, i = shape
        return [((e,), f"{prefix}{e}.down_proj.weight", (hidden, i)) for e in range(n_experts)]
    return []


# --------------------------------------------------------------------------- reading headers


def read_headers(path: str | Path) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` of every tensor of a checkpoint directory; reads no tensor data.

    Uses ``model.safetensors.index.json`` when present (every listed shard must exist and hold
    exactly the tensors the index gives it), else ``model.safetensors``. Raises
    :class:`CheckpointError` naming the file that is missing, unreadable or inconsistent.
    """
    path = Path(path)
    index_path = path / INDEX_FILE
    weight_map: dict[str, str] | None = None
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise TypeError("weight_map is not a mapping of tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read {index_path}: {exc}") from None
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    elif not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    else:
        raise CheckpointError(f"{path} holds neither {INDEX_FILE} nor {SINGLE_FILE}")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        file_path = path / file
        if not file_path.is_file():
            raise CheckpointError(f"{index_path} names shard {file}, which does not exist in {path}")
        for info in _read_header(file_path):
            if info.name in tensors:
                raise CheckpointError(f"tensor {info.name} is in both {tensors[info.name].file} and {file} of {path}")
            tensors[info.name] = info
    if weight_map is not None:
        problems = [
            f"{INDEX_FILE} lists {name} in {file}, but {file} does not hold it"
            for name, file in weight_map.items()
            if name not in tensors or tensors[name].file != file
        ]
        unlisted = [i for i in tensors.values() if i.name not in weight_map]
        problems += [f"{i.file} holds {i.name}, which {INDEX_FILE} does not list" for i in unlisted]
        if problems:
            raise CheckpointError(_problems_message(path, problems))
    return tensors


def _read_header(file_path: Path) -> list[TensorInfo]:
    try:
        with safe_open(file_path, framework="pt") as f:
            out = []
            for name in f.keys():
                sl = f.get_slice(name)
                out.append(TensorInfo(name, file_path.name, tuple(sl.get_shape()), sl.get_dtype()))
            return out
    except Exception as exc:  # safetensors raises SafetensorError (an Exception) on a corrupt file
        raise CheckpointError(f"cannot read safetensors file {file_path}: {exc}") from None


def _read_hf_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config_path = path / CONFIG_FILE
    try:
        hf = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {config_path}: {exc}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_path} does not hold a JSON object")
    return hf


def _fp8_block(hf: dict[str, Any], path: Path) -> int:
    """Block edge of the FP8 weights of ``quantization_config``; FP8_BLOCK when there is none."""
    q = hf.get("quantization_config")
    if not q:
        return FP8_BLOCK
    where = path / CONFIG_FILE
    method, fmt = q.get("quant_method", "fp8"), q.get("fmt", "e4m3")
    if method != "fp8" or fmt != "e4m3":
        raise CheckpointError(f"{where}: quantization_config {method}/{fmt} is not supported; raymoe reads fp8/e4m3")
    block = q.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])
    if not (isinstance(block, list) and len(block) == 2 and block[0] == block[1] and int(block[0]) > 0):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size {block} is not a square [b, b] block")
    return int(block[0])


# --------------------------------------------------------------------------- validation


def _plan_pieces(
    expected: dict[str, tuple[int, ...]],
    tensors: dict[str, TensorInfo],
    num_hidden_layers: int,
    num_mtp: int,
    quantized: bool,
    block: int,
    path: Path,
) -> list[_Piece]:
    """Match every expected entry to checkpoint tensors; raise one CheckpointError listing every problem."""
    where = _listing_file(path)
    problems: list[str] = []
    pieces: list[_Piece] = []
    used: set[str] = set()
    for key, shape in expected.items():
        name = checkpoint_name(key, num_hidden_layers)
        wanted = [((), name, shape)] if name in tensors else _expert_pieces(name, shape) or [((), name, shape)]
        for index, src_name, src_shape in wanted:
            info = tensors.get(src_name)
            if info is None:
                problems.append(f"tensor {src_name} {list(src_shape)} is missing from {where}")
                continue
            used.add(src_name)
            if info.shape != src_shape:
                problems.append(_shape_problem(info, src_shape))
                continue
            scale = None
            if info.dtype == _FP8_DTYPE:
                scale = tensors.get(src_name + SCALE_SUFFIX)
                scale_problem = _fp8_problem(info, scale, quantized, block)
                if scale_problem:
                    problems.append(scale_problem)
                    continue
                used.add(scale.name)
            elif info.dtype not in _FLOAT_DTYPES:
                problems.append(f"tensor {src_name} in {info.file} has dtype {info.dtype}, expected a float dtype")
                continue
            pieces.append(_Piece(key, index, info, scale))
    # MTP layers repeat the shared embedding and output head; the model keeps one of each
    copies = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
    shared = {
        f"model.layers.{num_hidden_layers + k}.{suffix}": expected[source]
        for k in range(num_mtp)
        for suffix, source in copies.items()
    }
    for name, info in tensors.items():
        if name in used:
            continue
        if name in shared:
            if info.shape != shared[name]:
                problems.append(_shape_problem(info, shared[name]))
        elif math.prod(info.shape) == 0:
            logger.debug("ignoring empty tensor %s %s in %s", name, list(info.shape), info.file)
        else:
            problems.append(f"unexpected tensor {name} {list(info.shape)} in {info.file}: the model has no such entry")
    if problems:
        raise CheckpointError(_problems_message(path, problems))
    return pieces


def _shape_problem(info: TensorInfo, want: tuple[int, ...]) -> str:
    return f"tensor {info.name} in {info.file} has shape {list(info.shape)}, expected {list(want)}"


def _fp8_problem(info: TensorInfo, scale: TensorInfo | None, quantized: bool, block: int) -> str | None:
    where = f"tensor {info.name} in {info.file}"
    if not quantized:
        return f"{where} is float8 but {CONFIG_FILE} has no quantization_config"
    if len(info.shape) != 2:
        return f"{where} is float8 with shape {list(info.shape)}; only 2-D float8 weights are supported"
    if scale is None:
        return f"{where} is float8 but the checkpoint has no {info.name}{SCALE_SUFFIX}"
    want = scale_shape(info.shape, block)
    if scale.shape != want or scale.dtype not in _FLOAT_DTYPES:
        return (
            f"tensor {scale.name} in {scale.file} has shape {list(scale.shape)} and dtype {scale.dtype}, expected "
            f"{list(want)} (⌈{list(info.shape)}/{block}⌉) and a float dtype"
        )
    return None


def _problems_message(path: Path, problems: list[str]) -> str:
    shown = problems[:_MAX_PROBLEMS_SHOWN]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return f"checkpoint {path} does not match the model ({len(problems)} problems):\n  " + "\n  ".join(shown) + more


def _listing_file(path: Path) -> Path:
    """The file that says which tensors a checkpoint holds: the index, or the single shard."""
    return path / (INDEX_FILE if (path / INDEX_FILE).is_file() else SINGLE_FILE)


def _mtp_layers_in(tensors: Iterable[str], num_hidden_layers: int) -> int:
    """How many consecutive layers from ``num_hidden_layers`` on (MTP modules) the checkpoint holds."""
    layers = {name.split(".")[2] for name in tensors if name.startswith("model.layers.")}
    n = 0
    while str(num_hidden_layers + n) in layers:
        n += 1
    return n


def _prepare(path: Path, cfg: ModelConfig | None, strict_mtp: bool) -> _Plan:
    """Read config and headers, choose the MTP depth, validate; no tensor data is read."""
    hf = _read_hf_config(path) if cfg is None or (path / CONFIG_FILE).is_file() else {}
    if cfg is None:
        try:
            cfg = model_config_from_hf(hf)
        except ConfigError as exc:
            raise CheckpointError(f"{path / CONFIG_FILE}: {exc}") from None
    block = _fp8_block(hf, path)
    tensors = read_headers(path)
    present = _mtp_layers_in(tensors, cfg.num_hidden_layers)
    declared = cfg.num_nextn_predict_layers
    if present < declared:
        absent = ", ".join(f"model.layers.{cfg.num_hidden_layers + k}.*" for k in range(present, declared))
        if strict_mtp:
            raise CheckpointError(
                f"{_listing_file(path)} has no tensors of the MTP modules {absent}, which {CONFIG_FILE} declares "
                f"(num_nextn_predict_layers={declared}); pass strict_mtp=False to load the model without them"
            )
        logger.warning("%s has no MTP modules %s; loading the model with %d of %d", path, absent, present, declared)
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=present)
    with torch.device("meta"):
        model = DeepseekV3(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    quantized = "quantization_config" in hf
    mtp = cfg.num_nextn_predict_layers
    pieces = _plan_pieces(expected, tensors, cfg.num_hidden_layers, mtp, quantized, block, path)
    return _Plan(cfg, model, pieces, block)


# --------------------------------------------------------------------------- loading


def _allocate(
    model: DeepseekV3, dtype: torch.dtype, device: torch.device | str, select: Callable[[str], bool] | None
) -> dict[str, torch.Tensor]:
    """Uninitialized tensors for the state dict of a meta model: parameters in ``dtype``, buffers as built."""
    params = {name for name, _ in model.named_parameters()}
    out = {}
    for key, t in model.state_dict().items():
        if select is not None and not select(key):
            continue
        kind = dtype if key in params and t.is_floating_point() else t.dtype
        out[key] = torch.empty(t.shape, dtype=kind, device=device)
    return out


@torch.no_grad()
def _copy(path: Path, pieces: list[_Piece], targets: dict[str, torch.Tensor], block: int) -> None:
    """Read the pieces whose key is in ``targets``, one shard at a time, into ``targets[key][index]``."""
    by_file: dict[str, list[_Piece]] = {}
    for piece in pieces:
        if piece.key in targets:
            by_file.setdefault(piece.source.file, []).append(piece)
    for n, file in enumerate(sorted(by_file), start=1):
        logger.info("loading %s (%d/%d)", path / file, n, len(by_file))
        try:
            with safe_open(path / file, framework="pt") as f:
                for piece in by_file[file]:
                    t = f.get_tensor(piece.source.name)
                    if piece.scale is not None:
                        if piece.scale.file == file:
                            scale = f.get_tensor(piece.scale.name)
                        else:
                            with safe_open(path / piece.scale.file, framework="pt") as g:
                                scale = g.get_tensor(piece.scale.name)
                        t = dequantize_fp8_blockwise(t, scale, block, torch.float32)
                    targets[piece.key][piece.index].copy_(t)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor data of {path / file}: {exc}") from exc


def _init_nonpersistent_buffers(model: DeepseekV3, device: torch.device | str) -> None:
    """Build the buffers that checkpoints do not hold (RoPE tables, expert load counters) on ``device``."""
    persistent = set(model.state_dict())
    rotary = None
    for name, buf in list(model.named_buffers()):
        if name in persistent:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(owner, RotaryEmbedding):
            rotary = rotary or RotaryEmbedding(model.cfg)
            value = getattr(rotary, attr)
        elif attr == "tokens_per_expert":
            value = torch.zeros(buf.shape, dtype=buf.dtype)
        else:
            raise RuntimeError(
                f"non-persistent buffer {name} has no initializer in {__name__}._init_nonpersistent_buffers; add one"
            )
        owner._buffers[attr] = value.to(device)


def load_state_dict_from_hf(
    path: str | Path,
    cfg: ModelConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    strict_mtp: bool = True,
    select: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Read a checkpoint into raymoe's state-dict layout (stacked experts, ``model.mtp.K``).

    Args:
        path: checkpoint directory.
        cfg: the model config; None reads ``config.json``.
        dtype: of floating-point parameters (FP8 weights are dequantized to it); buffers (the
            gate bias ``e_score_correction_bias`` [E]) stay float32.
        device: where the tensors are allocated.
        strict_mtp: when False, MTP modules missing from the checkpoint are left out (their keys
            are absent) instead of raising.
        select: keep only the keys for which it returns True (e.g. one stage's layers); the
            whole checkpoint is validated all the same.

    Returns:
        ``{key: tensor}`` for every persistent entry of ``DeepseekV3(cfg).state_dict()``.

    Raises:
        CheckpointError: a file is missing or unreadable, or a tensor is missing, unknown or of
            the wrong shape or dtype; raised before any tensor is allocated.
    """
    path = Path(path)
    plan = _prepare(path, cfg, strict_mtp)
    targets = _allocate(plan.model, dtype, device, select)
    _copy(path, plan.pieces, targets, plan.block)
    return targets


def load_hf_checkpoint(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    strict_mtp: bool = True,
) -> DeepseekV3:
    """Build a :class:`DeepseekV3` from a Hugging Face / DeepSeek-V3 checkpoint directory.

    The model is built on the meta device and its tensors are allocated once, on ``device``,
    only after every header has been checked. Parameters are in ``dtype``; buffers stay float32.

    Args:
        path: directory with ``config.json`` and safetensors shards.
        dtype: of the parameters (FP8 weights are dequantized to it).
        device: where the model lives.
        strict_mtp: a checkpoint without (some of) the MTP modules its config declares (e.g. one
            written by transformers, which drops them) raises unless this is False; then the model
            is built with the MTP modules the checkpoint holds.

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: as :func:`load_state_dict_from_hf`; nothing is returned or half-loaded.
    """
    path = Path(path)
    plan = _prepare(path, None, strict_mtp)
    targets = _allocate(plan.model, dtype, device, None)
    _copy(path, plan.pieces, targets, plan.block)
    model = plan.model
    model.load_state_dict(targets, strict=True, assign=True)
    _init_nonpersistent_buffers(model, device)
    return model.eval()


def load_hf_checkpoint_into(model: DeepseekV3, path: str | Path) -> None:
    """Copy a checkpoint's weights into an existing model, in place (its dtype and device are kept).

    Every header is checked against ``model.state_dict()`` first: on a :class:`CheckpointError`
    the model is unchanged. Fields of ``config.json`` that differ from ``model.cfg`` without
    changing any shape (e.g. ``rope_theta``) are logged as a warning.
    """
    path = Path(path)
    hf = _read_hf_config(path)
    try:
        differ = [
            f.name for f in dataclasses.fields(ModelConfig)
            if getattr(model_config_from_hf(hf), f.name) != getattr(model.cfg, f.name)
        ]  # fmt: skip
    except ConfigError as exc:
        raise CheckpointError(f"{path / CONFIG_FILE}: {exc}") from None
    if differ:
        logger.warning("%s differs from the model's config in %s", path / CONFIG_FILE, ", ".join(differ))
    block = _fp8_block(hf, path)
    targets = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in targets.items()}
    quantized = "quantization_config" in hf
    pieces = _plan_pieces(
        expected, read_headers(path), model.cfg.num_hidden_layers, len(model.model.mtp), quantized, block, path
    )
    _copy(path, pieces, targets, block)
