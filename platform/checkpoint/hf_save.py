"""Saving a :class:`DeepseekV3` as a DeepSeek-V3 / Hugging Face checkpoint directory.

The layout is the one ``raymoe.platform.checkpoint.hf`` loads: per-expert tensors, MTP module k as
layer ``num_hidden_layers + k`` (with copies of the shared embedding and head), sharded
safetensors with an index. Everything is written into a temporary sibling directory that is
renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterable
from typing import Any

import torch

from raymoe.platform import storage
from raymoe.platform.checkpoint.hf import checkpoint_name
from raymoe.platform.checkpoint.layout import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    HF_INDEX_FILE,
    HF_SINGLE_FILE,
    CheckpointError,
    parse_expert_name,
    split_experts,
)
from raymoe.platform.checkpoint.tensorfile import write_tensors
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
    """The checkpoint tensors of a model, in DeepSeek-V3's layout (per-expert gate/up/down, MTP as layers)."""
    params = {name for name, _ in model.named_parameters()}
    num_layers = model.cfg.num_hidden_layers
    state = model.state_dict()
    entries = []
    for key, t in split_experts(state).items():
        expert = parse_expert_name(key)
        is_param = (expert[0] if expert else key) in params
        out_dtype = dtype if dtype is not None and is_param and t.is_floating_point() else t.dtype
        name = checkpoint_name(key, num_layers)
        if expert is None:
            entries.append(_Entry(name, t, out_dtype))
        elif name.endswith(".gate_up_proj"):  # ...experts.E.gate_up_proj [2I, D] -> gate_proj, up_proj
            prefix, i = name[: -len("gate_up_proj")], t.shape[0] // 2
            entries += [_Entry(f"{prefix}gate_proj.weight", t[:i], out_dtype),
                        _Entry(f"{prefix}up_proj.weight", t[i:], out_dtype)]  # fmt: skip
        else:  # ...experts.E.down_proj [D, I]
            entries.append(_Entry(f"{name}.weight", t, out_dtype))
    for k in range(len(model.mtp_modules())):
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


def save_hf_checkpoint(
    model: DeepseekV3,
    path: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    extra_files: Iterable[str] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> str:
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
    path = str(path)
    if storage.is_file(path):
        raise CheckpointError(f"cannot save a checkpoint to {path}: it exists and is not a directory")
    extras = [str(f) for f in extra_files or ()]
    reserved = {CONFIG_FILE, GENERATION_CONFIG_FILE, HF_INDEX_FILE, HF_SINGLE_FILE}
    names_of = [e.rstrip("/").rsplit("/", 1)[-1] for e in extras]
    for extra, name in zip(extras, names_of):
        if not storage.is_file(extra):
            raise FileNotFoundError(f"extra file {extra} to copy into the checkpoint does not exist")
        if name in reserved or name.endswith(".safetensors"):
            raise CheckpointError(f"extra file {extra} would overwrite the checkpoint's own {name}")
    if len(set(names_of)) != len(extras):
        raise CheckpointError(f"extra files {extras} have clashing names")
    shards = _shards(_save_entries(model, dtype), max_shard_bytes)
    n_shards = len(shards)
    files = (
        [HF_SINGLE_FILE]
        if n_shards == 1
        else [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]
    )
    fs, local_path = storage.filesystem(path)
    local = storage.is_local(fs)
    # a local checkpoint is written into a temporary sibling and renamed; on an object store config.json goes last
    target = path
    if local:
        parent, _, leaf = local_path.rstrip("/").rpartition("/")
        target = f"{parent}/.{leaf}.tmp-{uuid.uuid4().hex[:12]}"
        storage.make_dirs(target)
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for n, (file, shard) in enumerate(zip(files, shards), start=1):
            logger.info("writing %s (%d/%d)", storage.join(path, file), n, len(shards))
            tensors = {e.name: e.tensor.detach().to(device="cpu", dtype=e.dtype) for e in shard}
            write_tensors(storage.join(target, file), tensors, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            total += sum(e.nbytes for e in shard)
        if len(shards) > 1:
            storage.write_json(storage.join(target, HF_INDEX_FILE), {"metadata": {"total_size": total},
                                                                      "weight_map": weight_map})  # fmt: skip
        for extra, name in zip(extras, names_of):
            storage.write_bytes(storage.join(target, name), storage.read_bytes(extra))
        gen = generation_config or {"bos_token_id": model.cfg.bos_token_id, "eos_token_id": model.cfg.eos_token_id}
        storage.write_json(storage.join(target, GENERATION_CONFIG_FILE), gen)
        param_dtype = dtype or model.dtype
        hf = {**model_config_to_hf(model.cfg), "dtype": str(param_dtype).removeprefix("torch.")}
        storage.write_json(storage.join(target, CONFIG_FILE), hf)
        if local:
            import os
            import shutil

            if os.path.exists(local_path):
                old = f"{target}.old"
                os.replace(local_path, old)
                os.replace(target, local_path)
                shutil.rmtree(old)
            else:
                os.replace(target, local_path)
    except BaseException:
        if local:
            storage.delete_dir(target)
        raise
    return path


def export_hf(location: str, out: str, dtype: torch.dtype | None = None) -> str:
    """Write the Hugging Face layout (config.json, safetensors, tokenizer.json) of any checkpoint to ``out``.

    ``location`` is a training checkpoint, a training output (its latest) or a Hugging Face checkpoint,
    local or a URI; ``out`` too. Returns the checkpoint that was exported."""
    from raymoe.platform.checkpoint.layout import TOKENIZER_FILE
    from raymoe.platform.checkpoint.reader import load_model, open_checkpoint

    reader = open_checkpoint(location)
    model = load_model(reader)
    tokenizer = storage.join(reader.location, TOKENIZER_FILE)
    save_hf_checkpoint(model, out, dtype=dtype, extra_files=[tokenizer] if storage.is_file(tokenizer) else [])
    return reader.location
