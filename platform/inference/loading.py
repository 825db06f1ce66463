"""What a Serve replica loads: the model, its tokenizer, EOS and chat template, from any checkpoint.

``location`` is a training output directory (its latest complete checkpoint), a training
checkpoint (either engine's), or a Hugging Face checkpoint directory; local or any pyarrow URI.
The tokenizer is the checkpoint's ``tokenizer.json`` (required: the HTTP API takes text); the
chat template is ``tokenizer_config.json``'s ``chat_template`` when there is one, otherwise
:data:`DEFAULT_CHAT_TEMPLATE`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from raymoe.platform.checkpoint.hf import CONFIG_FILE, GENERATION_CONFIG_FILE, CheckpointError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# A checkpoint without a chat template gets this one (Jinja, the variables transformers passes):
# each message as "<|role|>\n<content>\n", then "<|assistant|>\n" for the reply.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class ServedModel:
    model: Any  # DeepseekV3, cast for inference
    tokenizer: Any  # tokenizers.Tokenizer
    eos_token_id: int | None
    chat_template: str
    checkpoint: str  # the resolved checkpoint location


def _read_text(location: str, name: str) -> str | None:
    from raymoe.platform.checkpoint.sharded import filesystem, join

    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(join(path, name)) as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def resolve_serving_checkpoint(location: str) -> str:
    """The checkpoint to serve: ``location`` when it is a checkpoint, else the latest one under it."""
    from raymoe.platform.checkpoint.training import resolve_checkpoint

    if _read_text(location, CONFIG_FILE) is not None:
        return location  # a Hugging Face checkpoint
    return resolve_checkpoint(location)


def load_served_model(location: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> ServedModel:
    """Load everything a replica serves; CheckpointError naming what is missing or wrong."""
    from tokenizers import Tokenizer

    from raymoe.platform.checkpoint.training import load_training_model
    from raymoe.platform.generate import prepare_for_inference

    path = resolve_serving_checkpoint(location)
    raw = _read_text(path, TOKENIZER_FILE)
    if raw is None:
        raise CheckpointError(f"checkpoint {path} has no {TOKENIZER_FILE}; the server needs the tokenizer")
    try:
        tokenizer = Tokenizer.from_str(raw)
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise CheckpointError(f"cannot read {TOKENIZER_FILE} of {path}: {exc}") from None
    from raymoe.platform.checkpoint.sharded import is_sharded_checkpoint

    if is_sharded_checkpoint(path):  # the actor graph's: one file per actor (it has a config.json too)
        model, _ = load_training_model(path)
    else:  # Hugging Face layout, which the local engine's checkpoints also have
        from raymoe.platform.checkpoint.hf import load_hf_checkpoint

        model = load_hf_checkpoint(path, dtype=torch.float32, strict_mtp=False)
    # float32 so far; the routers stay float32 after the cast below
    if tokenizer.get_vocab_size() > model.cfg.vocab_size:
        raise CheckpointError(
            f"the tokenizer of {path} has {tokenizer.get_vocab_size()} tokens, more than the model's "
            f"vocab_size {model.cfg.vocab_size}"
        )
    model = prepare_for_inference(model.to(device), dtype)
    return ServedModel(model, tokenizer, _eos(path, model.cfg), _chat_template(path), path)


def _eos(path: str, cfg: Any) -> int | None:
    eos: Any = cfg.eos_token_id
    raw = _read_text(path, GENERATION_CONFIG_FILE)
    if raw:
        try:
            eos = json.loads(raw).get("eos_token_id", eos)
        except (ValueError, AttributeError):
            pass
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos


def _chat_template(path: str) -> str:
    raw = _read_text(path, TOKENIZER_CONFIG_FILE)
    if raw:
        try:
            template = json.loads(raw).get("chat_template")
        except (ValueError, AttributeError):
            template = None
        if isinstance(template, str) and template.strip():
            return template
    return DEFAULT_CHAT_TEMPLATE
