"""What generation and serving read from a checkpoint besides the weights: tokenizer, EOS, chat template.

``location`` is a training output (its latest complete checkpoint), a training checkpoint or a
Hugging Face checkpoint directory, local or any pyarrow URI (:func:`~raymoe.platform.checkpoint.layout.resolve`).
The tokenizer is the checkpoint's ``tokenizer.json``; the chat template is ``tokenizer_config.json``'s
``chat_template`` when there is one, otherwise :data:`DEFAULT_CHAT_TEMPLATE`. The weights are read
by whoever computes: :func:`~raymoe.platform.checkpoint.reader.load_model` in one process, or each
actor of the graph its own share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from raymoe.platform import storage
from raymoe.platform.checkpoint.layout import (
    GENERATION_CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    CheckpointError,
)
from raymoe.platform.checkpoint.reader import Reader, open_checkpoint

# A checkpoint without a chat template gets this one (Jinja, the variables transformers passes):
# each message as "<|role|>\n<content>\n", then "<|assistant|>\n" for the reply.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class ServedCheckpoint:
    """A checkpoint opened for generation: its reader (headers only, no weights), tokenizer, EOS and template."""

    reader: Reader
    tokenizer: Any  # tokenizers.Tokenizer, or None when none was required and there is none
    eos_token_id: int | None
    chat_template: str

    @property
    def location(self) -> str:
        return self.reader.location

    @property
    def model_config(self) -> Any:
        return self.reader.model_config


def open_served(location: str, tokenizer_required: bool = True) -> ServedCheckpoint:
    """Open a checkpoint for generation: CheckpointError naming what is missing or wrong (no weights are read)."""
    reader = open_checkpoint(str(location))
    path = reader.location
    tokenizer = None
    raw = storage.read_text(storage.join(path, TOKENIZER_FILE))
    if raw is None:
        if tokenizer_required:
            raise CheckpointError(f"checkpoint {path} has no {TOKENIZER_FILE}; text needs the tokenizer")
    else:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_str(raw)
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise CheckpointError(f"cannot read {TOKENIZER_FILE} of {path}: {exc}") from None
        if tokenizer.get_vocab_size() > reader.model_config.vocab_size:
            raise CheckpointError(
                f"the tokenizer of {path} has {tokenizer.get_vocab_size()} tokens, more than the model's "
                f"vocab_size {reader.model_config.vocab_size}"
            )
    return ServedCheckpoint(reader, tokenizer, _eos(path, reader.model_config), _chat_template(path))


def _eos(path: str, cfg: Any) -> int | None:
    """EOS of ``generation_config.json`` if present (its first, when a list), else the model config's."""
    eos: Any = cfg.eos_token_id
    raw = storage.read_text(storage.join(path, GENERATION_CONFIG_FILE))
    if raw:
        try:
            eos = json.loads(raw).get("eos_token_id", eos)
        except (ValueError, AttributeError):
            pass
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos


def _chat_template(path: str) -> str:
    raw = storage.read_text(storage.join(path, TOKENIZER_CONFIG_FILE))
    if raw:
        try:
            template = json.loads(raw).get("chat_template")
        except (ValueError, AttributeError):
            template = None
        if isinstance(template, str) and template.strip():
            return template
    return DEFAULT_CHAT_TEMPLATE
