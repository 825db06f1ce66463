"""Sharded training checkpoints of the actor graph, on a local path or any pyarrow filesystem URI.

``ROOT/checkpoints/step_00000050/`` holds one safetensors file per actor that owns tensors
(``stage-00.safetensors`` per attention stage, written by its first replica, and
``experts-00.safetensors`` per expert shard), ``shards.json`` (which file holds which tensor)
and ``trainer_state.json`` (step, biases, placement, loader position, RNG, config), written last.

Tensor names are the model's state-dict names, with routed experts one by one
(``model.layers.3.mlp.experts.17.gate_up_proj`` [2I, D]) so that any placement can read the
experts it holds; optimizer state is ``optimizer.<name>.<exp_avg|exp_avg_sq|step>``. A
checkpoint is complete or invisible: on a local filesystem it is written under a temporary name
and renamed; on an object store (no rename) its ``trainer_state.json`` is written last and a
directory without one is not a checkpoint.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from raymoe.platform.checkpoint.hf import CheckpointError

FORMAT = "raymoe-sharded-1"
SHARDS_FILE = "shards.json"
STATE_FILE = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"
OPTIMIZER_PREFIX = "optimizer."
STEP_DIR_RE = re.compile(r"^step_(\d{8})$")
_EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_up_proj|down_proj)$")
_STACKED_RE = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) of a local path or a URI such as ``s3://bucket/run`` or ``file:///x``."""
    import pyarrow.fs as pafs

    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError
            raise CheckpointError(f"cannot open checkpoint location {uri!r}: {exc}") from None
    import os

    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def is_local(fs: Any) -> bool:
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


# -- names ------------------------------------------------------------------------------------


def expert_name(stacked: str, expert: int) -> str:
    """``model.layers.3.mlp.experts.gate_up_proj`` + 17 -> ``model.layers.3.mlp.experts.17.gate_up_proj``."""
    m = _STACKED_RE.match(stacked)
    if m is None:
        raise ValueError(f"{stacked} is not a stacked expert tensor")
    return f"{m.group(1)}.{expert}.{m.group(2)}"


def split_experts(tensors: dict[str, torch.Tensor], expert_ids: dict[str, list[int]] | None = None) -> dict:
    """Stacked expert tensors (and their optimizer state) one expert per tensor; others unchanged.

    ``expert_ids[stacked name]`` gives the global id of each row (default 0..n-1)."""
    ids = dict(expert_ids or {})
    for name, t in tensors.items():
        base, _ = _optimizer_split(name)
        if _STACKED_RE.match(base) and t.ndim > 0:
            ids.setdefault(base, list(range(t.shape[0])))
    out = {}
    for name, t in tensors.items():
        base, suffix = _optimizer_split(name)
        if _STACKED_RE.match(base) is None:
            out[name] = t
        elif t.ndim == 0:  # the scalar AdamW step of a stacked tensor: one copy per expert
            for e in ids.get(base, []):
                out[_with_suffix(expert_name(base, e), suffix, name)] = t.clone()
        else:
            for row, e in zip(t.unbind(0), ids[base]):
                out[_with_suffix(expert_name(base, e), suffix, name)] = row.contiguous()
    return out


def stack_experts(tensors: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_experts` for a whole model: experts 0..n-1 stacked again."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for name, t in tensors.items():
        base, suffix = _optimizer_split(name)
        m = _EXPERT_RE.match(base)
        if m is None:
            out[name] = t
            continue
        stacked = _with_suffix(f"{m.group(1)}.{m.group(3)}", suffix, name)
        groups.setdefault(stacked, {})[int(m.group(2))] = t
    for stacked, rows in groups.items():
        missing = sorted(set(range(n_experts)) - set(rows))
        if missing:
            raise CheckpointError(f"{stacked}: experts {missing[:8]} are missing from the checkpoint")
        if rows[0].ndim == 0:  # AdamW step counts are equal for all experts
            out[stacked] = rows[0]
        else:
            out[stacked] = torch.stack([rows[e] for e in range(n_experts)])
    return out


def _optimizer_split(name: str) -> tuple[str, str | None]:
    if name.startswith(OPTIMIZER_PREFIX):
        base, _, kind = name[len(OPTIMIZER_PREFIX) :].rpartition(".")
        return base, kind
    return name, None


def _with_suffix(base: str, suffix: str | None, original: str) -> str:
    return f"{OPTIMIZER_PREFIX}{base}.{suffix}" if suffix is not None else base


def optimizer_state_tensors(named_params: Iterable[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer) -> dict:
    """AdamW state as ``optimizer.<param>.<exp_avg|exp_avg_sq|step>`` tensors (CPU, contiguous)."""
    out = {}
    for name, p in named_params:
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                out[f"{OPTIMIZER_PREFIX}{name}.{key}"] = value.detach().cpu().contiguous()
    return out


def load_optimizer_state(
    named_params: Iterable[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer, tensors: dict
) -> None:
    """Put :func:`optimizer_state_tensors` back (parameters without saved state keep none)."""
    for name, p in named_params:
        state = {}
        for kind in ("exp_avg", "exp_avg_sq", "step"):
            t = tensors.get(f"{OPTIMIZER_PREFIX}{name}.{kind}")
            if t is not None:
                if kind != "step" and tuple(t.shape) != tuple(p.shape):
                    raise CheckpointError(
                        f"optimizer state {name}.{kind} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}"
                    )
                state[kind] = t.to(p.device).clone()
        if state:
            optimizer.state[p] = state


# -- files ------------------------------------------------------------------------------------


def write_file(directory: str, filename: str, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Write ``tensors`` as one safetensors file ``directory/filename``; returns the names written."""
    fs, path = filesystem(directory)
    fs.create_dir(path, recursive=True)
    data = save_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    with fs.open_output_stream(join(path, filename)) as f:
        f.write(data)
    return sorted(tensors)


def read_file(directory: str, filename: str, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of ``directory/filename`` (only ``names`` when given; read lazily on a local disk)."""
    fs, path = filesystem(directory)
    full = join(path, filename)
    try:
        if is_local(fs):
            from safetensors import safe_open

            with safe_open(full, framework="pt") as f:
                keys = list(names) if names is not None else list(f.keys())
                return {k: f.get_tensor(k) for k in keys}
        with fs.open_input_stream(full) as f:
            tensors = load_bytes(f.read())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {directory}/{filename} is missing") from None
    except Exception as exc:  # safetensors raises SafetensorError, pyarrow OSError
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"cannot read {directory}/{filename}: {exc}") from None
    return tensors if names is None else {k: tensors[k] for k in names}


def write_json(directory: str, filename: str, obj: Any) -> None:
    fs, path = filesystem(directory)
    with fs.open_output_stream(join(path, filename)) as f:
        f.write(json.dumps(obj).encode())


def read_json(directory: str, filename: str) -> Any:
    fs, path = filesystem(directory)
    try:
        with fs.open_input_stream(join(path, filename)) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}/{filename} is missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {directory}/{filename}: {exc}") from None


# -- checkpoint directories ---------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def begin_checkpoint(root: str, step: int) -> tuple[str, str]:
    """(directory to write into, final directory) of the checkpoint of ``step`` under ``root``."""
    fs, path = filesystem(root)
    final = join(root, CHECKPOINTS_DIR, step_dir_name(step))
    if is_local(fs):
        _remove_stale_temporaries(fs, filesystem(join(root, CHECKPOINTS_DIR))[1])
        tmp = join(root, CHECKPOINTS_DIR, f".tmp-{step_dir_name(step)}-{uuid.uuid4().hex[:8]}")
        fs.create_dir(filesystem(tmp)[1], recursive=True)
        return tmp, final
    fs_final = filesystem(final)[1]
    if fs.get_file_info(join(fs_final, STATE_FILE)).type.name != "NotFound":
        fs.delete_file(join(fs_final, STATE_FILE))  # rewriting a step: invisible until done again
    fs.create_dir(fs_final, recursive=True)
    return final, final


def _remove_stale_temporaries(fs: Any, checkpoints: str) -> None:
    """Remove ``.tmp-*`` folders of checkpoints that were being written when a process died (one writer per root)."""
    import pyarrow.fs as pafs

    for info in fs.get_file_info(pafs.FileSelector(checkpoints, allow_not_found=True)):
        if info.base_name.startswith(".tmp-") and info.type == pafs.FileType.Directory:
            try:
                fs.delete_dir(info.path)
            except OSError:
                pass


def commit_checkpoint(writing: str, final: str, state: dict[str, Any], shards: dict[str, str]) -> str:
    """Write the index and the state (last), then make the checkpoint visible; returns ``final``."""
    write_json(writing, SHARDS_FILE, {"format": FORMAT, "weight_map": shards})
    write_json(writing, STATE_FILE, {"format": FORMAT, **state})
    if writing != final:
        fs, tmp_path = filesystem(writing)
        final_path = filesystem(final)[1]
        if fs.get_file_info(final_path).type.name != "NotFound":
            fs.delete_dir(final_path)
        fs.move(tmp_path, final_path)
    return final


def abort_checkpoint(writing: str, final: str) -> None:
    """Remove a temporary directory that was not committed (never a visible checkpoint)."""
    if writing != final:
        fs, path = filesystem(writing)
        try:
            fs.delete_dir(path)
        except (FileNotFoundError, OSError):
            pass


def latest_checkpoint_uri(root: str) -> str | None:
    """The complete checkpoint with the highest step under ``root/checkpoints`` (or ``root`` itself)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(root)
    if fs.get_file_info(join(path, STATE_FILE)).type == pafs.FileType.File:
        return root
    infos = fs.get_file_info(pafs.FileSelector(join(path, CHECKPOINTS_DIR), allow_not_found=True))
    best = None
    for info in infos:
        m = STEP_DIR_RE.match(info.base_name)
        if m and info.type == pafs.FileType.Directory:
            if fs.get_file_info(join(info.path, STATE_FILE)).type == pafs.FileType.File:
                step = int(m.group(1))
                if best is None or step > best[0]:
                    best = (step, info.base_name)
    return join(root, CHECKPOINTS_DIR, best[1]) if best else None


def is_sharded_checkpoint(path: str) -> bool:
    """Whether ``path`` is a checkpoint of this format (it has ``shards.json``)."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    return fs.get_file_info(join(p, SHARDS_FILE)).type == pafs.FileType.File


class ShardedCheckpoint:
    """Reads a sharded checkpoint: its state, and any tensors by name wherever they were written."""

    def __init__(self, path: str) -> None:
        self.path = str(path)
        index = read_json(self.path, SHARDS_FILE)
        if index.get("format") != FORMAT:
            raise CheckpointError(f"{self.path}/{SHARDS_FILE} has format {index.get('format')!r}, expected {FORMAT}")
        self.weight_map: dict[str, str] = index["weight_map"]
        self.state: dict[str, Any] = read_json(self.path, STATE_FILE)

    def names(self) -> list[str]:
        return list(self.weight_map)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``; a name the checkpoint lacks is an error naming it."""
        by_file: dict[str, list[str]] = {}
        missing = []
        for name in names:
            file = self.weight_map.get(name)
            if file is None:
                missing.append(name)
            else:
                by_file.setdefault(file, []).append(name)
        if missing:
            raise CheckpointError(
                f"{self.path} has no tensor {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        out = {}
        for file, file_names in by_file.items():
            out.update(read_file(self.path, file, file_names))
        return out

    def read_prefixed(self, predicate) -> dict[str, torch.Tensor]:  # noqa: ANN001
        return self.read([n for n in self.weight_map if predicate(n)])

    def full_state(self, n_experts: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(model state dict, optimizer tensors) of the whole model, experts stacked."""
        tensors = stack_experts(self.read(self.weight_map), n_experts)
        model = {k: v for k, v in tensors.items() if not k.startswith(OPTIMIZER_PREFIX)}
        optim = {k: v for k, v in tensors.items() if k.startswith(OPTIMIZER_PREFIX)}
        return model, optim
