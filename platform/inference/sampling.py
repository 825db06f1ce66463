"""Sampling parameters of a request and the choice of tokens from logits, speculative drafts included.

Greedy when ``temperature == 0``; otherwise softmax(logits / temperature) restricted to the top-k
tokens and then to the nucleus (top-p). Each request with a seed draws from its own
``torch.Generator``, so a seed reproduces its sample whatever else is in the batch.

Speculative acceptance with a greedy draft d (the MTP module's argmax): the target distribution p
accepts d with probability p(d); on rejection the token is drawn from p with d removed,
renormalized. This is speculative sampling (Leviathan et al., 2023) with a one-hot draft
distribution, so the output is distributed exactly as p; under greedy, d is kept iff it is the
argmax, which makes speculative greedy decoding token-identical to plain greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GREEDY_TEMPERATURE = 0.0
MAX_STOP_STRINGS = 4  # OpenAI's limit on `stop`


class SamplingError(ValueError):
    """A sampling parameter is out of range; ``field`` names it (as the OpenAI API spells it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class SamplingParams:
    """What a request asks of generation (OpenAI's names; ``top_k`` 0 means off)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def check(self, max_tokens_limit: int) -> None:
        """Raise SamplingError naming the first field out of range."""
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= max_tokens_limit:
            limit = max_tokens_limit
            raise SamplingError("max_tokens", f"max_tokens must be an integer in [1, {limit}], got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise SamplingError("temperature", f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError("top_k", f"top_k must be a non-negative integer (0 = off), got {self.top_k}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("stop", f"stop must be at most {MAX_STOP_STRINGS} non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution to sample from [V] (float32), for a non-greedy request, from logits [V]."""
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        outside = (probs.cumsum(-1) - probs) >= params.top_p  # the tokens before already cover top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return logits.softmax(-1)


def choose(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """The next token from logits [V]."""
    if params.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(probabilities(logits, params), 1, generator=gen))


def accept_draft(logits: torch.Tensor, draft: int, params: SamplingParams, gen: torch.Generator) -> tuple[bool, int]:
    """Verify a greedy draft against the target logits [V]: (accepted, the token at this position)."""
    if params.greedy:
        target = int(logits.argmax())
        return target == draft, target
    p = probabilities(logits, params)
    if float(torch.rand((), generator=gen)) < float(p[draft]):
        return True, draft
    residual = p.clone()
    residual[draft] = 0.0
    if float(residual.sum()) <= 0.0:  # p was all on the draft: it is always accepted above
        return True, draft
    return False, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
