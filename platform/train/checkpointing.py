"""Training checkpoints: the model in the Hugging Face layout plus everything needed to resume.

``OUTPUT/checkpoints/step_00000050/`` holds ``config.json``, the safetensors shards (the gate
biases among them), ``tokenizer.json``, ``optimizer.safetensors`` (AdamW state by parameter
name) and ``trainer_state.json`` (step, loader position, RNG states, the run's config). It is
written under a temporary name and renamed when complete, so a crash while writing never leaves
a broken checkpoint, and the latest complete one is always the one with the highest step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from raymoe.platform.checkpoint import load_hf_checkpoint_into, save_hf_checkpoint
from raymoe.platform.model import DeepseekV3

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STEP_DIR_RE = re.compile(r"^step_(\d{8})$")
STATE_FORMAT_VERSION = 1


class ResumeError(ValueError):
    """A checkpoint cannot be resumed from; the message says which file and why."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(output: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``output/checkpoints`` (or ``output`` itself)."""
    root = Path(output)
    if (root / STATE_FILE).is_file():
        return root
    ckpts = root / CHECKPOINTS_DIR
    if not ckpts.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in ckpts.iterdir() if (m := STEP_DIR_RE.match(p.name)) and p.is_dir()]
    steps = [(s, p) for s, p in steps if (p / STATE_FILE).is_file()]
    return max(steps)[1] if steps else None


def optimizer_tensors(model: DeepseekV3, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state as ``{param_name}.{exp_avg|exp_avg_sq|step}`` tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                out[f"{name}.{key}"] = value.detach().cpu().contiguous()
    return out


def load_optimizer_tensors(
    model: DeepseekV3, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> None:
    """Put :func:`optimizer_tensors` back into ``optimizer`` (whose parameters are ``model``'s)."""
    params = dict(model.named_parameters())
    check_optimizer_tensors(model, tensors)
    for name, p in params.items():
        state = {
            k: tensors[f"{name}.{k}"].to(p.device)
            for k in ("exp_avg", "exp_avg_sq", "step")
            if f"{name}.{k}" in tensors
        }
        if state:
            optimizer.state[p] = state


def check_optimizer_tensors(model: DeepseekV3, tensors: dict[str, torch.Tensor]) -> None:
    """Raise :class:`ResumeError` if ``tensors`` name parameters the model lacks or have wrong shapes."""
    params = dict(model.named_parameters())
    problems = []
    for key, value in tensors.items():
        name, _, kind = key.rpartition(".")
        if name not in params or kind not in ("exp_avg", "exp_avg_sq", "step"):
            problems.append(f"{key}: no such parameter state")
        elif kind != "step" and tuple(value.shape) != tuple(params[name].shape):
            problems.append(f"{key}: shape {tuple(value.shape)}, parameter has {tuple(params[name].shape)}")
    if problems:
        raise ResumeError(f"{OPTIMIZER_FILE} does not match the model: " + "; ".join(problems[:5]))


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


def save_training_checkpoint(
    output: str | Path,
    step: int,
    model: DeepseekV3,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    extra_files: list[Path] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write the checkpoint after ``step`` optimizer steps; returns its directory.

    ``state`` is JSON-serializable trainer state (loader position, config, metrics history
    pointers); the step and RNG states are added here.
    """
    root = Path(output) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{uuid.uuid4().hex[:8]}"
    try:
        save_hf_checkpoint(model, tmp, extra_files=extra_files)
        save_file(optimizer_tensors(model, optimizer), str(tmp / OPTIMIZER_FILE))
        full_state = {"format_version": STATE_FORMAT_VERSION, "step": step, "rng": rng_state(), **state}
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(full_state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("checkpoint of step %d written to %s", step, final)
    if keep_last:
        _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.iterdir() if STEP_DIR_RE.match(p.name))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_training_checkpoint(path: str | Path, model: DeepseekV3, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore ``model`` (weights and biases), ``optimizer`` and the RNG from ``path``; returns the trainer state.

    Everything is checked before anything is changed: the model files first (by the checkpoint
    loader), then the optimizer file.
    """
    path = Path(path)
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResumeError(f"cannot read {state_file}: {exc}") from None
    if state.get("format_version") != STATE_FORMAT_VERSION:
        raise ResumeError(
            f"{state_file} has format version {state.get('format_version')}, expected {STATE_FORMAT_VERSION}"
        )
    try:
        opt_tensors = load_file(str(path / OPTIMIZER_FILE))
    except Exception as exc:  # safetensors raises its own error types
        raise ResumeError(f"cannot read {path / OPTIMIZER_FILE}: {exc}") from None
    check_optimizer_tensors(model, opt_tensors)
    load_hf_checkpoint_into(model, path)
    load_optimizer_tensors(model, optimizer, opt_tensors)
    set_rng_state(state["rng"])
    return state
