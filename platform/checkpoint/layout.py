"""Every name of raymoe's checkpoints, in one place: folders, files, tensor names, and what a location is.

Two layouts exist:

- **training checkpoints** (what every trainer writes, local or on the actor graph):
  ``ROOT/checkpoints/step_00000050/`` holds one safetensors file per part (``model-00`` for the
  single-process trainer, ``stage-SS`` per attention stage and ``experts-KK`` per expert shard on
  the graph), ``shards.json`` (which file holds which tensor), ``trainer_state.json`` (step,
  biases, placement, RNG, loader position, the run's config: written last), ``config.json`` and
  the tokenizer. Tensor names are the model's state-dict names with routed experts one by one
  (``model.layers.3.mlp.experts.17.gate_up_proj`` [2I, D]), so that any placement reads the
  experts it holds; optimizer state is ``optimizer.<name>.<exp_avg|exp_avg_sq|step>``.
- **Hugging Face / DeepSeek-V3 checkpoints** (import and :func:`~raymoe.platform.checkpoint.hf_save`
  export): ``config.json``, ``model.safetensors[.index.json]``, the tokenizer.

A fine-tune's **delta** (:mod:`raymoe.platform.checkpoint.delta`) holds only the tensors it changed and
loads over its base. A *location* is a local path, a pyarrow URI, or a Model Registry version (``models:/NAME/VERSION``,
``models:/NAME@ALIAS``: the checkpoint it was registered with); :func:`resolve` says which
checkpoint it means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from raymoe.platform import storage

CHECKPOINTS_DIR = "checkpoints"
STEP_DIR_RE = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
SHARDS_FILE = "shards.json"
FORMAT = "raymoe-sharded-1"
OPTIMIZER_PREFIX = "optimizer."
OPTIMIZER_KINDS = ("exp_avg", "exp_avg_sq", "step")
COLOCATED_FILE = "model-00.safetensors"

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
HF_INDEX_FILE = "model.safetensors.index.json"
HF_SINGLE_FILE = "model.safetensors"
LOADS_FILE = "expert_loads.json"  # a calibration's expert loads, beside the checkpoint (raymoe.platform.analysis.loads)
DELTA_FILE = "delta.json"  # a fine-tune's changed tensors over its base (raymoe.platform.checkpoint.delta)

_EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_up_proj|down_proj)$")
_STACKED_RE = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not match the model; the message names the tensor and file."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def stage_file(stage: int) -> str:
    return f"stage-{stage:02d}.safetensors"


def experts_file(shard: int) -> str:
    return f"experts-{shard:02d}.safetensors"


# -- tensor names -------------------------------------------------------------------------------


def expert_name(stacked: str, expert: int) -> str:
    """``model.layers.3.mlp.experts.gate_up_proj`` + 17 -> ``model.layers.3.mlp.experts.17.gate_up_proj``."""
    m = _STACKED_RE.match(stacked)
    if m is None:
        raise ValueError(f"{stacked} is not a stacked expert tensor")
    return f"{m.group(1)}.{expert}.{m.group(2)}"


def parse_expert_name(name: str) -> tuple[str, int] | None:
    """``...experts.17.gate_up_proj`` -> (``...experts.gate_up_proj``, 17); None for other names."""
    m = _EXPERT_RE.match(name)
    return (f"{m.group(1)}.{m.group(3)}", int(m.group(2))) if m else None


def is_stacked_expert(name: str) -> bool:
    return _STACKED_RE.match(name) is not None


def optimizer_name(param: str, kind: str) -> str:
    return f"{OPTIMIZER_PREFIX}{param}.{kind}"


def _optimizer_split(name: str) -> tuple[str, str | None]:
    if name.startswith(OPTIMIZER_PREFIX):
        base, _, kind = name[len(OPTIMIZER_PREFIX) :].rpartition(".")
        return base, kind
    return name, None


def _with_kind(base: str, kind: str | None) -> str:
    return optimizer_name(base, kind) if kind is not None else base


def split_experts(tensors: dict[str, torch.Tensor], expert_ids: dict[str, list[int]] | None = None) -> dict:
    """Stacked expert tensors (and their optimizer state) one expert per tensor; others unchanged.

    ``expert_ids[stacked name]`` gives the global id of each row (default 0..n-1)."""
    ids = dict(expert_ids or {})
    for name, t in tensors.items():
        base, _ = _optimizer_split(name)
        if is_stacked_expert(base) and t.ndim > 0:
            ids.setdefault(base, list(range(t.shape[0])))
    out = {}
    for name, t in tensors.items():
        base, kind = _optimizer_split(name)
        if not is_stacked_expert(base):
            out[name] = t
        elif t.ndim == 0:  # the scalar AdamW step of a stacked tensor: one copy per expert
            for e in ids.get(base, []):
                out[_with_kind(expert_name(base, e), kind)] = t.clone()
        else:
            for row, e in zip(t.unbind(0), ids[base]):
                out[_with_kind(expert_name(base, e), kind)] = row.contiguous()
    return out


def stack_experts(tensors: dict[str, torch.Tensor], expert_ids: dict[str, list[int]] | int) -> dict:
    """The inverse of :func:`split_experts`: the experts ``expert_ids[stacked name]`` stacked in that order.

    An int n means experts 0..n-1 of every stacked tensor; an expert missing is a CheckpointError."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for name, t in tensors.items():
        base, kind = _optimizer_split(name)
        parsed = parse_expert_name(base)
        if parsed is None:
            out[name] = t
            continue
        groups.setdefault(_with_kind(parsed[0], kind), {})[parsed[1]] = t
    for stacked, rows in groups.items():
        base, _ = _optimizer_split(stacked)
        ids = list(range(expert_ids)) if isinstance(expert_ids, int) else expert_ids[base]
        missing = [e for e in ids if e not in rows]
        if missing:
            raise CheckpointError(f"{stacked}: experts {missing[:8]} are missing")
        first = rows[ids[0]] if ids else None
        if first is not None and first.ndim == 0:  # AdamW step counts are equal for all experts
            out[stacked] = first
        elif ids:
            out[stacked] = torch.stack([rows[e] for e in ids])
    return out


# -- what a location is -------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """A checkpoint location: ``kind`` "training" (trainer_state.json, shards.json), "hf" (config.json + weights)
    or "delta" (delta.json: a fine-tune's changed tensors over its base)."""

    location: str
    kind: str


def is_training_checkpoint(location: str) -> bool:
    return storage.is_file(storage.join(location, STATE_FILE)) and storage.is_file(storage.join(location, SHARDS_FILE))


def is_hf_checkpoint(location: str) -> bool:
    return storage.is_file(storage.join(location, CONFIG_FILE)) and (
        storage.is_file(storage.join(location, HF_INDEX_FILE))
        or storage.is_file(storage.join(location, HF_SINGLE_FILE))
    )


def run_checkpoints(root: str) -> list[tuple[int, str]]:
    """Every complete training checkpoint of the run under ``root`` (``root/checkpoints/step_*``), as
    (step, location) by step; empty when there is none."""
    folder = storage.join(root, CHECKPOINTS_DIR)
    found = []
    for name, is_dir in storage.list_dir(folder):
        m = STEP_DIR_RE.match(name)
        if m and is_dir and storage.is_file(storage.join(folder, name, STATE_FILE)):
            found.append((int(m.group(1)), storage.join(folder, name)))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    """The complete training checkpoint with the highest step under ``root/checkpoints`` (or ``root`` itself)."""
    if is_training_checkpoint(root):
        return str(root)
    found = run_checkpoints(root)
    return found[-1][1] if found else None


MODEL_URI_PREFIX = "models:/"  # a Model Registry version (raymoe.platform.tracking.resolve_model_uri)


def model_uri_in(location: str) -> str | None:
    """The ``models:/…`` URI ``location`` is, or None.

    Also recovers one that a caller made absolute as if it were a path (``/cwd/models:/raymoe/3``,
    as ``os.path.abspath`` does) when no such path exists."""
    location = str(location)
    if location.startswith(MODEL_URI_PREFIX):
        return location
    i = location.find("/" + MODEL_URI_PREFIX)
    if i >= 0 and "://" not in location and not storage.exists(location):
        return location[i + 1 :]
    return None


def resolve(location: str) -> Resolved:
    """The checkpoint ``location`` means: itself (a training or Hugging Face checkpoint), a training
    output's latest complete checkpoint, or the one a Model Registry version (``models:/NAME/VERSION``)
    was registered with, found in ``$MLFLOW_TRACKING_URI`` (or ``mlruns.db`` here). CheckpointError
    naming what was looked for otherwise."""
    location = str(location)
    model_uri = model_uri_in(location)
    if model_uri is not None:
        from raymoe.platform.tracking import resolve_model_uri

        try:
            source = resolve_model_uri(model_uri)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        if model_uri_in(source) is not None:
            raise CheckpointError(f"{model_uri} was registered with {source}, another model URI, not a checkpoint")
        return resolve(source)
    if is_training_checkpoint(location):
        return Resolved(location, "training")
    if storage.is_file(storage.join(location, DELTA_FILE)):  # raymoe.platform.checkpoint.delta
        return Resolved(location, "delta")
    if is_hf_checkpoint(location):
        return Resolved(location, "hf")
    latest = latest_checkpoint(location)
    if latest is not None:
        return Resolved(latest, "training")
    if not storage.exists(location):
        raise CheckpointError(f"checkpoint {location} does not exist")
    raise CheckpointError(
        f"{location} is not a checkpoint: neither a training checkpoint ({STATE_FILE} and {SHARDS_FILE}), a "
        f"Hugging Face checkpoint ({CONFIG_FILE} and {HF_INDEX_FILE} or {HF_SINGLE_FILE}), nor a training output "
        f"with a complete checkpoint under {CHECKPOINTS_DIR}/step_*"
    )
