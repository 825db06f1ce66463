"""Reading training checkpoints of either engine by tensor name, so any layout loads into any other.

The local engine writes the Hugging Face layout plus ``optimizer.safetensors``
(``raymoe.platform.train.checkpointing``); the actor graph writes one file per actor
(:mod:`raymoe.platform.checkpoint.sharded`). Both are read here in the sharded naming: model
state-dict names with routed experts one by one, optimizer state as ``optimizer.<name>.<kind>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from raymoe.platform.checkpoint.hf import CheckpointError
from raymoe.platform.checkpoint.sharded import (
    OPTIMIZER_PREFIX,
    ShardedCheckpoint,
    is_sharded_checkpoint,
    load_optimizer_state,
    split_experts,
)
from raymoe.platform.config import ModelConfig

LOCAL_OPTIMIZER_FILE = "optimizer.safetensors"


def _local_format_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from raymoe.platform.checkpoint.hf import load_hf_checkpoint

    model = load_hf_checkpoint(path, dtype=torch.float32, strict_mtp=False)
    tensors = dict(model.state_dict())
    try:
        opt = load_file(f"{path}/{LOCAL_OPTIMIZER_FILE}")
    except FileNotFoundError:
        opt = {}
    tensors.update({f"{OPTIMIZER_PREFIX}{k}": v for k, v in opt.items()})
    return split_experts(tensors)


def read_training_tensors(
    path: str,
    names: Iterable[str],
    model_cfg: ModelConfig | None = None,
    optional: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of the training checkpoint at ``path`` (either engine's layout).

    Names for which ``optional(name)`` is true may be absent (e.g. optimizer state of
    parameters that never got a gradient); any other absent name is a :class:`CheckpointError`.
    """
    names = list(names)
    path = str(path)
    if is_sharded_checkpoint(path):
        ckpt = ShardedCheckpoint(path)
        present = set(ckpt.weight_map)
    else:
        local = _local_format_tensors(path)
        present = set(local)
    missing = [n for n in names if n not in present and not (optional and optional(n))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {path} has no tensor {missing[0]}{more}")
    wanted = [n for n in names if n in present]
    if is_sharded_checkpoint(path):
        return ckpt.read(wanted)
    return {n: local[n] for n in wanted}


def load_sharded_into_local(path: str, model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load an actor-graph checkpoint into a single-process ``DeepseekV3`` and its AdamW; returns the state."""
    ckpt = ShardedCheckpoint(path)
    state, optim = ckpt.full_state(model.cfg.n_routed_experts)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {str(exc).splitlines()[0]}") from None
    load_optimizer_state(list(model.named_parameters()), optimizer, optim)
    return ckpt.state


def resolve_checkpoint(location: str) -> str:
    """A checkpoint itself, or a training output (or checkpoint root) meaning its latest complete checkpoint."""
    from raymoe.platform.checkpoint.sharded import latest_checkpoint_uri

    found = latest_checkpoint_uri(str(location))
    if found is None:
        raise CheckpointError(
            f"{location} is neither a training checkpoint nor a training output with a complete checkpoint "
            f"(looked for trainer_state.json there and under checkpoints/step_*)"
        )
    return found


def load_training_model(location: str) -> tuple[Any, str]:
    """The model (float32, eval mode) of a training checkpoint of either engine; returns (model, checkpoint)."""
    from raymoe.platform.checkpoint.hf import load_hf_checkpoint
    from raymoe.platform.checkpoint.sharded import STATE_FILE, read_json
    from raymoe.platform.config import config_from_dict
    from raymoe.platform.model import DeepseekV3

    path = resolve_checkpoint(location)
    if not is_sharded_checkpoint(path):
        return load_hf_checkpoint(path, dtype=torch.float32, strict_mtp=False).eval(), path
    state = read_json(path, STATE_FILE)
    cfg = config_from_dict(state["config"])
    with torch.device("meta"):
        model = DeepseekV3(cfg.model)
    model = model.to_empty(device="cpu")
    from raymoe.platform.checkpoint.hf import _init_nonpersistent_buffers

    _init_nonpersistent_buffers(model, "cpu")
    weights, _ = ShardedCheckpoint(path).full_state(cfg.model.n_routed_experts)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit its own config: {str(exc).splitlines()[0]}") from None
    return model.eval(), path


def export_hf(location: str, out: str, dtype: torch.dtype | None = None) -> str:
    """Write the Hugging Face layout (config.json, safetensors, tokenizer.json) of a training checkpoint to ``out``."""
    import os
    import tempfile

    from raymoe.platform.checkpoint.hf_save import save_hf_checkpoint
    from raymoe.platform.checkpoint.sharded import filesystem, join

    model, path = load_training_model(location)
    fs, base = filesystem(path)
    extra = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = join(base, "tokenizer.json")
        if fs.get_file_info(tok).type.name == "File":
            local_tok = os.path.join(tmp, "tokenizer.json")
            with fs.open_input_stream(tok) as src, open(local_tok, "wb") as dst:
                dst.write(src.read())
            extra.append(local_tok)
        save_hf_checkpoint(model, out, dtype=dtype, extra_files=extra)
    return path
