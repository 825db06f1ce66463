"""The built-in corpus (the Python standard library's own source) and a local byte-level BPE.

Every machine with Python has the corpus, so the demo and the tests need no download.
"""

from __future__ import annotations

import logging
import sysconfig
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")  # ids 0, 1, 2: the model config's bos/eos defaults
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}


def stdlib_files(max_bytes: int | None = None) -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library, sorted, up to ``max_bytes`` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library at {root}")
    if max_bytes is None:
        return files
    out, total = [], 0
    for p in files:
        size = p.stat().st_size
        if total + size > max_bytes and out:
            break
        out.append(p)
        total += size
    return out


def train_tokenizer(texts: Iterator[str], vocab_size: int, path: Path | None = None):
    """Train a byte-level BPE (``tokenizers``) of ``vocab_size`` ids; save it as ``tokenizer.json`` at ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(path))
    return tokenizer
