"""Sampling parameters of a request and the choice of tokens from logits, speculative drafts included.

Greedy when ``temperature`` is below :data:`MIN_SAMPLING_TEMPERATURE` (0 included); otherwise
softmax(logits / temperature) restricted to the top-k tokens and then to the nucleus (top-p). Below
that threshold logits / temperature can overflow float32 (1e-40 turned every logit into inf and the
distribution into NaN), and the distribution is one-hot on the argmax anyway. Each request with a
seed draws from its own ``torch.Generator``, so a seed reproduces its sample whatever else is in
the batch; a seed must lie in the generator's range, [:data:`SEED_MIN`, :data:`SEED_MAX`].

Log-probabilities (:func:`token_logprob`) are those of the model's distribution, log_softmax of the
raw logits, before temperature, top-k and top-p, for the chosen token and the ``logprobs`` most
likely ones.

Speculative acceptance with a greedy draft d (the MTP module's argmax): the target distribution p
accepts d with probability p(d); on rejection the token is drawn from p with d removed,
renormalized. This is speculative sampling (Leviathan et al., 2023) with a one-hot draft
distribution, so the output is distributed exactly as p; under greedy, d is kept iff it is the
argmax, which makes speculative greedy decoding token-identical to plain greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Below this, sampling is greedy: at 1e-5 a logit of 1e33 still divides to a finite float32
# (vLLM's _SAMPLING_EPS is the same value).
MIN_SAMPLING_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
MAX_STOP_STRINGS = 4  # OpenAI's limit on `stop`
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


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
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k most likely

    def check(self, max_tokens_limit: int | None = None) -> None:
        """Raise SamplingError naming the first field out of range (``max_tokens_limit`` None: no upper bound)."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingError("max_tokens", f"max_tokens must be a positive integer, got {self.max_tokens}")
        if max_tokens_limit is not None and self.max_tokens > max_tokens_limit:
            limit = max_tokens_limit
            raise SamplingError("max_tokens", f"max_tokens must be an integer in [1, {limit}], got {self.max_tokens}")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:  # False for NaN too
            raise SamplingError("temperature", f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError("top_k", f"top_k must be a non-negative integer (0 = off), got {self.top_k}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("stop", f"stop must be at most {MAX_STOP_STRINGS} non-empty strings, got {self.stop!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX):
            raise SamplingError("seed", f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise SamplingError("logprobs", f"logprobs must be a non-negative integer, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of a request with ``seed``: seed + index, wrapped into the generator's range."""
    if seed is None:
        return None
    return SEED_MIN + (seed - SEED_MIN + index) % (SEED_MAX - SEED_MIN + 1)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (None: from the OS), which must lie in [SEED_MIN, SEED_MAX]."""
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
        outside[0] = False  # the most likely token always stays (a top_p that rounds to 0 in float32: 5e-324)
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


@dataclass
class TokenLogprob:
    """The log-probability of a chosen token and of the most likely alternatives at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """Log-probabilities under the model's distribution, log_softmax(logits [V]), of ``token`` and the ``top`` best."""
    logprobs = logits.float().log_softmax(-1)
    best = logprobs.topk(min(top, logprobs.shape[-1])) if top > 0 else None
    alternatives = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(token, float(logprobs[token]), alternatives)
