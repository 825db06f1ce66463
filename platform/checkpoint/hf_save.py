"""Saving a :class:`DeepseekV3` as a DeepSeek-V3 / Hugging Face checkpoint directory.

The layout is the one ``raymoe.platform.checkpoint.hf`` loads: per-expert tensors, MTP module k as
layer ``num_hidden_layers + k`` (with copies of the shared embedding and head), sharded
safetensors with an index. Everything is written into a temporary sibling directory that is
renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from raymoe.platform.checkpoint.hf import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    _expert_pieces,
    checkpoint_name,
)
from raymoe.platform.config import model_config_to_hf
from raymoe.platform.model.transformer import DeepseekV3

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    tensor: torch.Tensor  # a view of the model's tensor; copied only when its shard is written
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.dtype.itemsize


def _save_entries(model: DeepseekV3, dtype: torch.dtype | None) -> list[_Entry]:
    """The checkpoint tensors of a model, in DeepSeek-V3's layout (per-expert, MTP as layers)."""
    state = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    num_layers = model.cfg.num_hidden_layers
    entries = []
    for key, t in state.items():
        out_dtype = dtype if dtype is not None and key in params and t.is_floating_point() else t.dtype
        name = checkpoint_name(key, num_layers)
        split = _expert_pieces(name, tuple(t.shape)) or [((), name, tuple(t.shape))]
        entries += [_Entry(piece_name, t[index], out_dtype) for index, piece_name, _ in split]
    for k in range(len(model.model.mtp)):
        layer = f"model.layers.{num_layers + k}."
        head_dtype = dtype or state["lm_head.weight"].dtype
        entries.append(_Entry(layer + "embed_tokens.weight", state["model.embed_tokens.weight"], head_dtype))
        entries.append(_Entry(layer + "shared_head.head.weight", state["lm_head.weight"], head_dtype))
    return entries


def _shards(entries: list[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
    """Consecutive entries grouped into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_hf_checkpoint(
    model: DeepseekV3,
    path: str | Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    extra_files: Iterable[str | Path] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a DeepSeek-V3 / Hugging Face checkpoint directory at ``path``.

    Writes ``config.json``, ``generation_config.json`` (``generation_config`` or the bos/eos ids),
    safetensors shards of at most ``max_shard_bytes`` (``model.safetensors`` alone when one
    suffices, else ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``), and
    copies of ``extra_files`` (e.g. ``tokenizer.json``). Experts are written one by one; MTP module
    k is layer ``num_hidden_layers + k`` with copies of ``embed_tokens`` and ``shared_head.head``.
    transformers' ``DeepseekV3ForCausalLM.from_pretrained`` loads the result (ignoring MTP).

    Everything is written into a temporary sibling directory that is renamed to ``path`` when
    complete (an existing checkpoint at ``path`` is replaced), so a crash never leaves a partial
    checkpoint at ``path``.

    Args:
        dtype: of floating-point parameters in the files (None: as in the model); buffers (the
            gate bias) keep their dtype, float32, as in DeepSeek's checkpoints.

    Returns:
        ``path``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {path}: it exists and is not a directory")
    extras = [Path(f) for f in extra_files or ()]
    reserved = {CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE, SINGLE_FILE}
    for extra in extras:
        if not extra.is_file():
            raise FileNotFoundError(f"extra file {extra} to copy into the checkpoint does not exist")
        if extra.name in reserved or extra.name.endswith(".safetensors"):
            raise CheckpointError(f"extra file {extra} would overwrite the checkpoint's own {extra.name}")
    if len({e.name for e in extras}) != len(extras):
        raise CheckpointError(f"extra files {[str(e) for e in extras]} have clashing names")
    shards = _shards(_save_entries(model, dtype), max_shard_bytes)
    n_shards = len(shards)
    names = (
        [SINGLE_FILE]
        if n_shards == 1
        else [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for n, (file, shard) in enumerate(zip(names, shards), start=1):
            logger.info("writing %s (%d/%d)", path / file, n, len(shards))
            tensors = {e.name: e.tensor.detach().to(device="cpu", dtype=e.dtype, copy=True).contiguous() for e in shard}
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            _fsync(tmp / file)
            weight_map.update(dict.fromkeys(tensors, file))
            total += sum(e.nbytes for e in shard)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        param_dtype = dtype or model.lm_head.weight.dtype
        hf = {**model_config_to_hf(model.cfg), "dtype": str(param_dtype).removeprefix("torch.")}
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2))
        gen = generation_config or {"bos_token_id": model.cfg.bos_token_id, "eos_token_id": model.cfg.eos_token_id}
        (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(gen, indent=2))
        for extra in extras:
            shutil.copy2(extra, tmp / extra.name)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:12]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
