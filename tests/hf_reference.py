"""transformers' DeepseekV3ForCausalLM as the reference implementation, at tiny sizes."""

from __future__ import annotations

from pathlib import Path

import torch

from raymoe.platform.config import ModelConfig, model_config_to_hf


def hf_config(cfg: ModelConfig):
    """A transformers ``DeepseekV3Config`` equal to ``cfg`` (MTP modules are not part of transformers' model)."""
    from transformers import DeepseekV3Config

    fields = model_config_to_hf(cfg)
    for key in ("architectures", "model_type", "rope_scaling", "rope_theta"):
        fields.pop(key, None)
    return DeepseekV3Config(**fields)


def hf_model(cfg: ModelConfig, seed: int = 0, bias_std: float = 0.1):
    """A random transformers model of ``cfg`` in eval mode, with random nonzero gate biases."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hf_config(cfg)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.e_score_correction_bias.normal_(0.0, bias_std)
    return model


def save_hf_checkpoint(cfg: ModelConfig, path: Path, seed: int = 0, max_shard_size: str = "200KB"):
    """Write a random tiny checkpoint with transformers' ``save_pretrained`` (sharded safetensors)."""
    model = hf_model(cfg, seed)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return model


BPE_VOCAB = 300  # <= the tiny model's 512
PYTHON_LINES = ["def f(x):\n    return x + 1\n", "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"]


def train_tokenizer(path: Path, vocab_size: int = BPE_VOCAB) -> Path:
    """A byte-level BPE (with ``<bos>`` and ``<eos>``) trained on a few lines of Python, saved as ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<bos>", "<eos>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(PYTHON_LINES * 20, trainer=trainer)
    assert tokenizer.get_vocab_size() <= vocab_size
    tokenizer.save(str(path))
    return path
