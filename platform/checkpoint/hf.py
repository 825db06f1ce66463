"""Hugging Face / DeepSeek-V3 checkpoints, read in raymoe's tensor names, tensor by tensor, from any location.

A checkpoint is a directory (a local path or a pyarrow URI): ``config.json``,
``model.safetensors.index.json`` and its shards (or a single ``model.safetensors``), in
DeepSeek-V3's layout:

- routed experts one by one, ``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``; raymoe's
  name of expert E is ``model.layers.N.mlp.experts.E.gate_up_proj`` [2I, D] (gate rows, then up
  rows) and ``...experts.E.down_proj`` [D, I]. transformers' stacked ``experts.gate_up_proj``
  [E, 2I, D] is read one expert (one row range) at a time as well;
- MTP module k (0-based) is layer ``num_hidden_layers + k`` (raymoe's ``model.mtp.k``); it also
  stores copies of the shared ``embed_tokens`` and output head (``shared_head.head``), which are
  checked and skipped;
- FP8 checkpoints (``quantization_config``): each e4m3 ``X.weight`` has a float32
  ``X.weight_scale_inv`` [⌈out/128⌉, ⌈in/128⌉] and is dequantized as it is read.

Opening one (:class:`HFCheckpoint`) reads ``config.json`` and every safetensors header, and checks
them against the model (names, shapes, dtypes) before any tensor data is read; every problem is
listed in one :class:`CheckpointError`. Saving is in ``hf_save``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from typing import Any

import torch

from raymoe.platform import storage
from raymoe.platform.checkpoint.fp8 import FP8_BLOCK, dequantize_fp8_blockwise, scale_shape
from raymoe.platform.checkpoint.layout import (
    CONFIG_FILE,
    HF_INDEX_FILE,
    HF_SINGLE_FILE,
    CheckpointError,
    parse_expert_name,
    split_experts,
)
from raymoe.platform.checkpoint.tensorfile import FLOAT_DTYPES, TensorFile, TensorInfo
from raymoe.platform.config import ConfigError, ModelConfig, model_config_from_hf

logger = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale_inv"  # FP8 ``X.weight`` has its block scales in ``X.weight_scale_inv``
_FP8_DTYPE = "F8_E4M3"
_MAX_PROBLEMS_SHOWN = 20


@dataclasses.dataclass(frozen=True)
class _Piece:
    """Checkpoint tensor ``source`` (its row ``row`` when stacked) fills ``rows`` of one of our tensors (None: all)."""

    source: TensorInfo
    row: int | None
    rows: slice | None
    scale: TensorInfo | None  # FP8 block scales of ``source``


# --------------------------------------------------------------------------- names


def checkpoint_name(key: str, num_hidden_layers: int) -> str:
    """Our state-dict key -> the checkpoint's name: ``model.mtp.K.x`` is ``model.layers.{L+K}.x``."""
    if key.startswith("model.mtp."):
        k, rest = key[len("model.mtp.") :].split(".", 1)
        return f"model.layers.{num_hidden_layers + int(k)}.{rest}"
    return key


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our name -> shape of every persistent tensor of ``DeepseekV3(cfg)``, routed experts one by one."""
    from raymoe.platform.model.transformer import DeepseekV3

    with torch.device("meta"):
        model = DeepseekV3(cfg)
    return {k: tuple(v.shape) for k, v in split_experts(model.state_dict()).items()}


# --------------------------------------------------------------------------- reading headers


def read_headers(location: str) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` of every tensor of a checkpoint directory; reads no tensor data.

    Uses ``model.safetensors.index.json`` when present (every listed shard must exist and hold
    exactly the tensors the index gives it), else ``model.safetensors``. Raises
    :class:`CheckpointError` naming the file that is missing, unreadable or inconsistent."""
    index_path = storage.join(location, HF_INDEX_FILE)
    weight_map: dict[str, str] | None = None
    if storage.is_file(index_path):
        try:
            weight_map = storage.read_json(index_path)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise TypeError("weight_map is not a mapping of tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read {index_path}: {exc}") from None
        files = sorted(set(weight_map.values()))
    elif storage.is_file(storage.join(location, HF_SINGLE_FILE)):
        files = [HF_SINGLE_FILE]
    elif not storage.is_dir(location):
        raise CheckpointError(f"checkpoint directory {location} does not exist")
    else:
        raise CheckpointError(f"{location} holds neither {HF_INDEX_FILE} nor {HF_SINGLE_FILE}")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        file_path = storage.join(location, file)
        if not storage.is_file(file_path):
            raise CheckpointError(f"{index_path} names shard {file}, which does not exist in {location}")
        for info in TensorFile(file_path).tensors.values():
            if info.name in tensors:
                raise CheckpointError(
                    f"tensor {info.name} is in both {tensors[info.name].file} and {file} of {location}"
                )
            tensors[info.name] = info
    if weight_map is not None:
        problems = [
            f"{HF_INDEX_FILE} lists {name} in {file}, but {file} does not hold it"
            for name, file in weight_map.items()
            if name not in tensors or tensors[name].file != file
        ]
        problems += [
            f"{i.file} holds {i.name}, which {HF_INDEX_FILE} does not list" for i in tensors.values()
            if i.name not in weight_map
        ]  # fmt: skip
        if problems:
            raise CheckpointError(_problems_message(location, problems))
    return tensors


def read_hf_config(location: str) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory as a dict."""
    path = storage.join(location, CONFIG_FILE)
    try:
        hf = storage.read_json(path)
    except FileNotFoundError:
        if not storage.exists(location):
            raise CheckpointError(f"checkpoint directory {location} does not exist") from None
        raise CheckpointError(f"{location} has no {CONFIG_FILE}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return hf


def _fp8_block(hf: dict[str, Any], location: str) -> int:
    """Block edge of the FP8 weights of ``quantization_config``; FP8_BLOCK when there is none."""
    q = hf.get("quantization_config")
    if not q:
        return FP8_BLOCK
    where = storage.join(location, CONFIG_FILE)
    method, fmt = q.get("quant_method", "fp8"), q.get("fmt", "e4m3")
    if method != "fp8" or fmt != "e4m3":
        raise CheckpointError(f"{where}: quantization_config {method}/{fmt} is not supported; raymoe reads fp8/e4m3")
    block = q.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])
    if not (isinstance(block, list) and len(block) == 2 and block[0] == block[1] and int(block[0]) > 0):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size {block} is not a square [b, b] block")
    return int(block[0])


def _mtp_layers_in(tensors: Iterable[str], num_hidden_layers: int) -> int:
    """How many consecutive layers from ``num_hidden_layers`` on (MTP modules) the checkpoint holds."""
    layers = {name.split(".")[2] for name in tensors if name.startswith("model.layers.")}
    n = 0
    while str(num_hidden_layers + n) in layers:
        n += 1
    return n


def _problems_message(location: str, problems: list[str]) -> str:
    shown = problems[:_MAX_PROBLEMS_SHOWN]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return f"checkpoint {location} does not match the model ({len(problems)} problems):\n  " + "\n  ".join(shown) + more


# --------------------------------------------------------------------------- the checkpoint


class HFCheckpoint:
    """A Hugging Face / DeepSeek-V3 checkpoint, validated against the model, read by raymoe's tensor names.

    Args:
        location: the checkpoint directory (local path or URI).
        cfg: the model config; None reads ``config.json``.
        strict_mtp: a checkpoint without (some of) the MTP modules its config declares (transformers
            drops them) raises unless this is False; then ``model_config`` has the MTP modules it holds.
    """

    kind = "hf"

    def __init__(self, location: str, cfg: ModelConfig | None = None, strict_mtp: bool = True) -> None:
        self.location = str(location)
        hf = (
            read_hf_config(self.location) if cfg is None or storage.is_file(storage.join(location, CONFIG_FILE)) else {}
        )
        if cfg is None:
            try:
                cfg = model_config_from_hf(hf)
            except ConfigError as exc:
                raise CheckpointError(f"{storage.join(self.location, CONFIG_FILE)}: {exc}") from None
        self.block = _fp8_block(hf, self.location)
        self.headers = read_headers(self.location)
        present = _mtp_layers_in(self.headers, cfg.num_hidden_layers)
        declared = cfg.num_nextn_predict_layers
        if present < declared:
            absent = ", ".join(f"model.layers.{cfg.num_hidden_layers + k}.*" for k in range(present, declared))
            if strict_mtp:
                raise CheckpointError(
                    f"{self._listing_file()} has no tensors of the MTP modules {absent}, which {CONFIG_FILE} declares "
                    f"(num_nextn_predict_layers={declared}); pass strict_mtp=False to load the model without them"
                )
            logger.warning("%s has no MTP modules %s; loading the model with %d of %d", location, absent, present,
                           declared)  # fmt: skip
            cfg = dataclasses.replace(cfg, num_nextn_predict_layers=present)
        self.model_config = cfg
        self.run_config = None
        self.state = None
        self.expected = expected_tensors(cfg)
        self.pieces = self._plan("quantization_config" in hf)

    def _listing_file(self) -> str:
        index = storage.join(self.location, HF_INDEX_FILE)
        return index if storage.is_file(index) else storage.join(self.location, HF_SINGLE_FILE)

    def names(self) -> list[str]:
        return list(self.expected)

    def has(self, name: str) -> bool:
        return name in self.pieces

    def describe(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, the file that holds it) of our tensor ``name``, from the headers (checked at open)."""
        pieces = self.pieces[name]
        return self.expected[name], ", ".join(sorted({p.source.file for p in pieces}))

    def _plan(self, quantized: bool) -> dict[str, list[_Piece]]:
        """Match every expected tensor to checkpoint tensors; one CheckpointError listing every problem."""
        cfg, tensors, where = self.model_config, self.headers, self._listing_file()
        problems: list[str] = []
        plan: dict[str, list[_Piece]] = {}
        used: set[str] = set()
        for key, shape in self.expected.items():
            wanted = self._sources(key, shape)
            pieces = []
            for src_name, row, rows, src_shape in wanted:
                info = tensors.get(src_name)
                if info is None:
                    problems.append(f"tensor {src_name} {list(src_shape)} is missing from {where}")
                    continue
                full_shape = src_shape if row is None else (info.shape[0], *src_shape)
                used.add(src_name)  # found: a wrong shape is one problem, not also an unexpected tensor
                if info.shape != full_shape or (row is not None and row >= info.shape[0]):
                    problems.append(f"tensor {src_name} in {info.file} has shape {list(info.shape)}, "
                                    f"expected {list(full_shape)}")  # fmt: skip
                    continue
                scale = None
                if info.dtype == _FP8_DTYPE:
                    scale = tensors.get(src_name + SCALE_SUFFIX)
                    problem = self._fp8_problem(info, scale, quantized)
                    if problem:
                        problems.append(problem)
                        continue
                    used.add(scale.name)
                elif info.dtype not in FLOAT_DTYPES:
                    problems.append(f"tensor {src_name} in {info.file} has dtype {info.dtype}, expected a float dtype")
                    continue
                pieces.append(_Piece(info, row, rows, scale))
            plan[key] = pieces
        # MTP layers repeat the shared embedding and output head; the model keeps one of each
        L = cfg.num_hidden_layers
        copies = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
        shared = {
            f"model.layers.{L + k}.{suffix}": self.expected[source]
            for k in range(cfg.num_nextn_predict_layers)
            for suffix, source in copies.items()
        }
        for name, info in tensors.items():
            if name in used:
                continue
            if name in shared:
                if info.shape != shared[name]:
                    problems.append(f"tensor {name} in {info.file} has shape {list(info.shape)}, "
                                    f"expected {list(shared[name])}")  # fmt: skip
            elif math.prod(info.shape) == 0:
                logger.debug("ignoring empty tensor %s %s in %s", name, list(info.shape), info.file)
            else:
                problems.append(
                    f"unexpected tensor {name} {list(info.shape)} in {info.file}: the model has no such entry"
                )
        if problems:
            raise CheckpointError(_problems_message(self.location, problems))
        return plan

    def _sources(self, key: str, shape: tuple[int, ...]) -> list[tuple[str, int | None, slice | None, tuple]]:
        """(checkpoint name, row of a stacked tensor or None, our rows it fills, its shape) of our tensor ``key``."""
        L = self.model_config.num_hidden_layers
        parsed = parse_expert_name(key)
        if parsed is None:
            return [(checkpoint_name(key, L), None, None, shape)]
        stacked, e = parsed
        stacked_name = checkpoint_name(stacked, L)
        if stacked_name in self.headers:  # transformers' stacked layout: row e of it
            return [(stacked_name, e, None, shape)]
        prefix = stacked_name.rsplit(".", 1)[0]  # ...mlp.experts
        if stacked.endswith("gate_up_proj"):
            i = shape[0] // 2
            return [
                (f"{prefix}.{e}.gate_proj.weight", None, slice(0, i), (i, shape[1])),
                (f"{prefix}.{e}.up_proj.weight", None, slice(i, 2 * i), (i, shape[1])),
            ]
        return [(f"{prefix}.{e}.down_proj.weight", None, None, shape)]

    def _fp8_problem(self, info: TensorInfo, scale: TensorInfo | None, quantized: bool) -> str | None:
        where = f"tensor {info.name} in {info.file}"
        if not quantized:
            return f"{where} is float8 but {CONFIG_FILE} has no quantization_config"
        if len(info.shape) != 2:
            return f"{where} is float8 with shape {list(info.shape)}; only 2-D float8 weights are supported"
        if scale is None:
            return f"{where} is float8 but the checkpoint has no {info.name}{SCALE_SUFFIX}"
        want = scale_shape(info.shape, self.block)
        if scale.shape != want or scale.dtype not in FLOAT_DTYPES:
            return (
                f"tensor {scale.name} in {scale.file} has shape {list(scale.shape)} and dtype {scale.dtype}, expected "
                f"{list(want)} (⌈{list(info.shape)}/{self.block}⌉) and a float dtype"
            )
        return None

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Our tensors ``names`` (FP8 weights dequantized to float32), read file by file, tensor by tensor."""
        names = list(names)
        unknown = [n for n in names if n not in self.pieces]
        if unknown:
            raise CheckpointError(f"the model read from {self.location} has no tensor {unknown[0]}")
        by_file: dict[str, list[_Piece]] = {}
        for name in names:
            for piece in self.pieces[name]:
                by_file.setdefault(piece.source.file, []).append(piece)
        raw: dict[tuple[str, int | None], torch.Tensor] = {}
        for file, pieces in by_file.items():
            f = TensorFile(storage.join(self.location, file))
            whole = sorted({p.source.name for p in pieces if p.row is None})
            raw.update({(n, None): t for n, t in f.read(whole).items()})
            for p in pieces:
                if p.row is not None:
                    raw[(p.source.name, p.row)] = f.read([p.source.name], rows={p.source.name: p.row})[p.source.name]
        scales = self._read_scales([p for name in names for p in self.pieces[name] if p.scale is not None])
        out = {}
        for name in names:
            parts = []
            for p in self.pieces[name]:
                t = raw[(p.source.name, p.row)]
                if p.scale is not None:
                    t = dequantize_fp8_blockwise(t, scales[p.scale.name], self.block, torch.float32)
                parts.append(t)
            dtypes = {t.dtype for t in parts}
            if len(dtypes) > 1:
                parts = [t.float() for t in parts]
            out[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out

    def _read_scales(self, pieces: list[_Piece]) -> dict[str, torch.Tensor]:
        by_file: dict[str, set[str]] = {}
        for p in pieces:
            by_file.setdefault(p.scale.file, set()).add(p.scale.name)
        out = {}
        for file, scale_names in by_file.items():
            out.update(TensorFile(storage.join(self.location, file)).read(sorted(scale_names)))
        return out
