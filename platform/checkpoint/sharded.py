"""Training checkpoints (see :mod:`raymoe.platform.checkpoint.layout`): written part by part, visible when complete.

A trainer writes a checkpoint in three moves: :func:`begin_checkpoint` gives the directory to write
into; every part (the single-process trainer, or each actor of the graph) writes its own tensors
there with :func:`write_part`; :func:`commit_checkpoint` writes ``shards.json``, ``config.json``, the
extra files (the tokenizer) and finally ``trainer_state.json``, and makes the checkpoint visible. On
a local disk it is written under a temporary name and renamed; on an object store (no rename) its
``trainer_state.json`` is written last and a directory without one is not a checkpoint.
``keep_last`` prunes older checkpoints after a commit.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import torch

from raymoe.platform import storage
from raymoe.platform.checkpoint.layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    FORMAT,
    OPTIMIZER_KINDS,
    SHARDS_FILE,
    STATE_FILE,
    STEP_DIR_RE,
    CheckpointError,
    optimizer_name,
    step_dir_name,
)
from raymoe.platform.checkpoint.tensorfile import TensorFile, write_tensors

logger = logging.getLogger(__name__)


# -- writing ------------------------------------------------------------------------------------


def begin_checkpoint(root: str, step: int) -> tuple[str, str]:
    """(directory to write into, final directory) of the checkpoint of ``step`` under ``root``."""
    final = storage.join(root, CHECKPOINTS_DIR, step_dir_name(step))
    fs, _ = storage.filesystem(root)
    if storage.is_local(fs):
        _remove_stale_temporaries(storage.join(root, CHECKPOINTS_DIR))
        tmp = storage.join(root, CHECKPOINTS_DIR, f".tmp-{step_dir_name(step)}-{uuid.uuid4().hex[:8]}")
        storage.make_dirs(tmp)
        return tmp, final
    state = storage.join(final, STATE_FILE)
    if storage.is_file(state):  # rewriting a step: invisible until done again
        fs_state = storage.filesystem(state)
        fs_state[0].delete_file(fs_state[1])
    storage.make_dirs(final)
    return final, final


def _remove_stale_temporaries(checkpoints: str) -> None:
    """Remove ``.tmp-*`` folders of checkpoints being written when a process died (one writer per root)."""
    for name, is_dir in storage.list_dir(checkpoints):
        if name.startswith(".tmp-") and is_dir:
            try:
                storage.delete_dir(storage.join(checkpoints, name))
            except OSError:
                pass


def write_part(directory: str, filename: str, tensors: dict[str, torch.Tensor]) -> tuple[str, list[str]]:
    """One part's tensors as ``directory/filename``, tensor by tensor; returns (filename, names written)."""
    return filename, write_tensors(storage.join(directory, filename), tensors)


def commit_checkpoint(
    writing: str,
    final: str,
    state: dict[str, Any],
    parts: list[tuple[str, list[str]]],
    config_json: dict[str, Any] | None = None,
    extra_files: Iterable[str] = (),
    keep_last: int = 0,
) -> str:
    """Index the parts, write the config and extra files, then the state (last); make it visible. Returns ``final``.

    ``extra_files`` are local paths or URIs copied in under their base names (the tokenizer)."""
    weight_map = {name: file for file, names in parts for name in names}
    storage.write_json(storage.join(writing, SHARDS_FILE), {"format": FORMAT, "weight_map": weight_map})
    if config_json is not None:
        storage.write_json(storage.join(writing, CONFIG_FILE), config_json)
    for extra in extra_files:
        name = str(extra).rstrip("/").rsplit("/", 1)[-1]
        storage.write_bytes(storage.join(writing, name), storage.read_bytes(str(extra)))
    storage.write_json(storage.join(writing, STATE_FILE), {"format": FORMAT, **state})
    if writing != final:
        fs, tmp_path = storage.filesystem(writing)
        final_path = storage.filesystem(final)[1]
        if fs.get_file_info(final_path).type.name != "NotFound":
            fs.delete_dir(final_path)
        fs.move(tmp_path, final_path)
    if keep_last:
        prune_checkpoints(final.rsplit("/", 2)[0], keep_last)
    return final


def save_checkpoint(
    root: str,
    step: int,
    write_parts: Callable[[str], list[tuple[str, list[str]]]],
    state: dict[str, Any],
    config_json: dict[str, Any],
    extra_files: Iterable[str] = (),
    keep_last: int = 0,
) -> str:
    """A whole checkpoint of ``step`` under ``root``: ``write_parts(directory)`` writes every part and
    returns (file, names) of each; then :func:`commit_checkpoint` (the RNG states join ``state``).
    Nothing is left behind on failure. Returns the checkpoint's location."""
    writing, final = begin_checkpoint(str(root), step)
    try:
        parts = write_parts(writing)
        full = {"step": step, **state, "rng": rng_state()}
        path = commit_checkpoint(writing, final, full, parts, config_json, extra_files, keep_last)
    except BaseException:
        abort_checkpoint(writing, final)
        raise
    logger.info("checkpoint of step %d written to %s", step, path)
    return path


def abort_checkpoint(writing: str, final: str) -> None:
    """Remove a temporary directory that was not committed (never a visible checkpoint)."""
    if writing != final:
        try:
            storage.delete_dir(writing)
        except OSError:
            pass


def prune_checkpoints(root: str, keep_last: int) -> list[str]:
    """Remove all but the ``keep_last`` newest complete checkpoints under ``root/checkpoints``; returns those removed.

    A folder without ``trainer_state.json`` (half written, or being written) is left alone."""
    folder = storage.join(root, CHECKPOINTS_DIR)
    steps = sorted(
        (int(m.group(1)), name)
        for name, is_dir in storage.list_dir(folder)
        if is_dir and (m := STEP_DIR_RE.match(name)) and storage.is_file(storage.join(folder, name, STATE_FILE))
    )
    removed = []
    for _, name in steps[: max(len(steps) - keep_last, 0)]:
        path = storage.join(folder, name)
        fs, p = storage.filesystem(path)
        try:  # the state file first: a half-deleted checkpoint is never taken for a complete one
            fs.delete_file(storage.join(p, STATE_FILE))
        except OSError:
            pass
        storage.delete_dir(path)
        removed.append(path)
    if removed:
        logger.info("train.keep_last=%d: removed %s", keep_last, ", ".join(removed))
    return removed


# -- optimizer state --------------------------------------------------------------------------------


def optimizer_state_tensors(
    named_params: Iterable[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer | None
) -> dict:
    """AdamW state as ``optimizer.<param>.<exp_avg|exp_avg_sq|step>`` tensors (CPU, contiguous); none without one."""
    out = {}
    if optimizer is None:
        return out
    for name, p in named_params:
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                out[optimizer_name(name, key)] = value.detach().cpu().contiguous()
    return out


def load_optimizer_state(
    named_params: Iterable[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer | None, tensors: dict
) -> None:
    """Put :func:`optimizer_state_tensors` back (parameters without saved state, or that do not train, keep none)."""
    for name, p in named_params:
        if optimizer is None or not p.requires_grad:
            continue
        state = {}
        for kind in OPTIMIZER_KINDS:
            t = tensors.get(optimizer_name(name, kind))
            if t is not None:
                if kind != "step" and tuple(t.shape) != tuple(p.shape):
                    raise CheckpointError(
                        f"optimizer state {name}.{kind} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}"
                    )
                state[kind] = t.to(p.device).clone()
        if state:
            optimizer.state[p] = state


# -- reading ------------------------------------------------------------------------------------


class TrainingCheckpoint:
    """Reads a training checkpoint: its state and run config, and any tensors by name wherever they were written."""

    kind = "training"

    def __init__(self, location: str) -> None:
        self.location = str(location)
        try:
            index = storage.read_json(storage.join(self.location, SHARDS_FILE))
            self.state: dict[str, Any] = storage.read_json(storage.join(self.location, STATE_FILE))
        except FileNotFoundError as exc:
            raise CheckpointError(f"{self.location} is not a training checkpoint: {exc} is missing") from None
        except OSError as exc:
            raise CheckpointError(str(exc)) from None
        if index.get("format") != FORMAT:
            raise CheckpointError(
                f"{self.location}/{SHARDS_FILE} has format {index.get('format')!r}, expected {FORMAT}"
            )
        self.weight_map: dict[str, str] = index["weight_map"]
        self._files: dict[str, TensorFile] = {}
        from raymoe.platform.config import ConfigError, config_from_dict

        try:
            self.run_config = config_from_dict(self.state["config"])
        except (KeyError, ConfigError) as exc:
            raise CheckpointError(f"{self.location}/{STATE_FILE} has no valid run config: {exc}") from None
        self.model_config = self.run_config.model

    def names(self) -> list[str]:
        return list(self.weight_map)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def describe(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, the file that holds it) of tensor ``name``, from its file's header."""
        return self.info(name).shape, self.weight_map[name]

    def info(self, name: str) -> Any:
        """The :class:`~raymoe.platform.checkpoint.tensorfile.TensorInfo` of ``name`` (a header is read once)."""
        return self._file(self.weight_map[name]).tensors[name]

    def byte_range(self, name: str) -> tuple[str, int, int]:
        """(the file's location, first byte, end byte) of tensor ``name``'s data in its safetensors file."""
        info = self.info(name)
        tf = self._file(info.file)
        return tf.location, tf.data_start + info.begin, tf.data_start + info.end

    def _file(self, file: str) -> TensorFile:
        if file not in self._files:
            self._files[file] = TensorFile(storage.join(self.location, file))
        return self._files[file]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, tensor by tensor; a name the checkpoint lacks is an error naming it."""
        by_file: dict[str, list[str]] = {}
        missing = []
        for name in names:
            file = self.weight_map.get(name)
            if file is None:
                missing.append(name)
            else:
                by_file.setdefault(file, []).append(name)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.location} has no tensor {missing[0]}{more}")
        out = {}
        for file, file_names in by_file.items():
            out.update(self._file(file).read(file_names))
        return out


# -- the RNG states a trainer records -----------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Torch's CPU (and CUDA) generator states, JSON-serializable."""
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
