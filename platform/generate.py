"""Single-process generation with the latent KV cache: prefill once, then one-token decode steps.

The cache is preallocated once for ``prompt + max_new_tokens`` tokens; the prompt is prefilled in
one call (the naive MLA path) and every later token is one decode step over the cache (the
absorbed MLA path), as in gpt-fast: the hot loop writes into preallocated tensors and syncs with
the host only to stop at EOS. Sampling is greedy (``temperature == 0``) or temperature plus
nucleus (top-p) sampling from a seeded ``torch.Generator``, so a seed reproduces a sample.

Shape legend: B batch, S prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from raymoe.platform.model.moe import Gate
from raymoe.platform.model.transformer import DeepseekV3

logger = logging.getLogger(__name__)

GREEDY_TEMPERATURE = 0.0  # temperatures at or below this pick the argmax

PromptIds = Sequence[Sequence[int]] | torch.Tensor


# --------------------------------------------------------------------------- precision


def prepare_for_inference(model: DeepseekV3, dtype: torch.dtype = torch.bfloat16) -> DeepseekV3:
    """Cast the model's parameters to ``dtype`` for inference, keeping the routers in float32.

    Every floating parameter becomes ``dtype`` except the gates' ``weight`` (the router, whose
    scores :class:`~raymoe.platform.model.moe.Gate` computes in float32 anyway). Buffers are left
    as they are: the gates' ``e_score_correction_bias``, the RoPE tables and the expert-load
    counters stay float32. The model is put in eval mode and returned (changed in place).
    """
    for module in model.modules():
        target = torch.float32 if isinstance(module, Gate) else dtype
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != target:
                param.data = param.data.to(target)
    return model.eval()


# --------------------------------------------------------------------------- sampling


def sample(
    logits: torch.Tensor,
    temperature: float = GREEDY_TEMPERATURE,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens [B] (int64) from logits [B, V].

    Greedy when ``temperature <= 0``; otherwise softmax(logits / temperature) restricted to the
    nucleus: the most probable tokens whose cumulative probability first reaches ``top_p`` (the
    most probable token is always kept, so a tiny ``top_p`` is greedy).
    """
    if temperature <= GREEDY_TEMPERATURE:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already cover top_p
        outside = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits.masked_fill_(outside, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A ``torch.Generator`` on ``device``, seeded with ``seed`` (or nondeterministically when None)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# --------------------------------------------------------------------------- validation


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def check_prompt(model: DeepseekV3, prompt: torch.Tensor, max_new_tokens: int) -> None:
    """Raise ValueError if prompt [B, S] is empty, holds ids outside the vocabulary, or would run
    past ``max_position_embeddings`` with ``max_new_tokens`` more tokens."""
    cfg = model.cfg
    if prompt.dim() != 2 or prompt.numel() == 0:
        raise ValueError(
            f"prompt must be a non-empty [batch, length] batch of token ids, got shape {list(prompt.shape)}"
        )
    bad = (prompt < 0) | (prompt >= cfg.vocab_size)
    if bool(bad.any()):
        raise ValueError(
            f"prompt token id {int(prompt[bad][0])} is outside the vocabulary (vocab_size {cfg.vocab_size})"
        )
    total = prompt.shape[1] + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds the "
            f"model's max_position_embeddings ({cfg.max_position_embeddings}); shorten the prompt or "
            f"lower max_new_tokens"
        )


def _as_batches(prompt_ids: PromptIds, device: torch.device) -> list[tuple[list[int], torch.Tensor]]:
    """Group prompts by length (the cache has one length per batch): [(row indices, ids [b, S])]."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must be [batch, length], got shape {list(prompt_ids.shape)}")
        return [(list(range(prompt_ids.shape[0])), prompt_ids.to(device=device, dtype=torch.long))]
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids holds no prompt")
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        by_length.setdefault(len(ids), []).append(i)
    return [
        (rows, torch.tensor([list(prompt_ids[i]) for i in rows], dtype=torch.long, device=device))
        for rows in by_length.values()
    ]


@contextmanager
def _loads_not_counted(model: DeepseekV3) -> Iterator[None]:
    """Stop the MoE layers counting expert loads (training state) while generating."""
    layers = model.moe_layers()
    saved = [moe.count_loads for moe in layers]
    for moe in layers:
        moe.count_loads = False
    try:
        yield
    finally:
        for moe, flag in zip(layers, saved):
            moe.count_loads = flag


# --------------------------------------------------------------------------- decoding


@torch.inference_mode()
def _decode(
    model: DeepseekV3,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
    eos_token_id: int | None,
    dtype: torch.dtype | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens [B], finished [B] bool) for each of up to N steps, on the model's device.

    A finished sequence (it produced ``eos_token_id`` at an earlier step) keeps receiving
    ``eos_token_id``; decoding stops when every sequence has finished. The decorator re-enters
    inference mode around each resumption, so the caller's code between steps is unaffected.
    """
    B, S = prompt.shape
    if max_new_tokens == 0:
        return
    with _loads_not_counted(model):
        cache = model.new_cache(B, S + max_new_tokens, dtype)
        logits = model(prompt, cache=cache, last_only=True)[:, -1]  # prefill, naive MLA: [B, V]
        finished = torch.zeros(B, dtype=torch.bool, device=prompt.device)  # [B]
        for step in range(max_new_tokens):
            tokens = sample(logits, temperature, top_p, generator)  # [B]
            if eos_token_id is not None:
                tokens.masked_fill_(finished, eos_token_id)
                finished |= tokens == eos_token_id
            yield tokens, finished
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                return
            logits = model(tokens.unsqueeze(1), cache=cache)[:, -1]  # decode, absorbed MLA: [B, V]


def stream_generate(
    model: DeepseekV3,
    prompt_ids: PromptIds,
    max_new_tokens: int,
    temperature: float = GREEDY_TEMPERATURE,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[list[int | None]]:
    """Generate step by step: yield, per step, the new token of each of the B sequences.

    prompt_ids: B prompts of one length (a [B, S] tensor or equal-length lists). A sequence
    that has finished (produced ``eos_token_id`` at an earlier step) yields None. Arguments are
    those of :func:`generate`; they are checked (ValueError) when this is called, not at the first
    step.
    """
    _check_sampling(max_new_tokens, temperature, top_p)
    device = model.lm_head.weight.device
    batches = _as_batches(prompt_ids, device)
    if len(batches) != 1:
        raise ValueError("stream_generate needs prompts of one length; generate() takes prompts of any lengths")
    prompt = batches[0][1]
    check_prompt(model, prompt, max_new_tokens)
    steps = _decode(
        model, prompt, max_new_tokens, temperature, top_p, make_generator(seed, device), eos_token_id, dtype
    )
    return _as_lists(steps, prompt.shape[0])


def _as_lists(steps: Iterator[tuple[torch.Tensor, torch.Tensor]], batch: int) -> Iterator[list[int | None]]:
    """(tokens [B], finished [B]) per step -> B ints per step, None for sequences finished before it."""
    done_before = [False] * batch
    for tokens, finished in steps:
        yield [None if done else t for t, done in zip(tokens.tolist(), done_before)]
        done_before = finished.tolist()


def generate(
    model: DeepseekV3,
    prompt_ids: PromptIds,
    max_new_tokens: int,
    temperature: float = GREEDY_TEMPERATURE,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
    dtype: torch.dtype | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens after each prompt; return the new tokens of each.

    Args:
        model: the model (its parameters' device is where generation runs).
        prompt_ids: a [B, S] tensor, or B lists of token ids (of any lengths: prompts of one
            length are decoded as one batch).
        max_new_tokens: N, the most tokens generated per sequence.
        temperature: 0 for greedy decoding, else the softmax temperature of sampling.
        top_p: nucleus sampling's probability mass (1.0 = no filtering).
        seed: seed of the sampling generator (None = nondeterministic); ignored when greedy.
        eos_token_id: a sequence stops after producing it (it is included in its output).
        dtype: dtype of the latent cache (default: the model's parameter dtype).

    Returns:
        B lists of new token ids, each at most N long (shorter when it ended with EOS).

    Raises:
        ValueError: a prompt is empty or has ids outside the vocabulary, a sampling argument is
            out of range, or a prompt plus N tokens exceeds ``max_position_embeddings``.
    """
    _check_sampling(max_new_tokens, temperature, top_p)
    device = model.lm_head.weight.device
    batches = _as_batches(prompt_ids, device)
    for _, prompt in batches:
        check_prompt(model, prompt, max_new_tokens)
    generator = make_generator(seed, device)
    results: list[list[int]] = [[] for _ in range(sum(len(rows) for rows, _ in batches))]
    for rows, prompt in batches:
        out = torch.empty(prompt.shape[0], max_new_tokens, dtype=torch.long, device=device)  # [b, N]
        steps = 0
        for tokens, _ in _decode(model, prompt, max_new_tokens, temperature, top_p, generator, eos_token_id, dtype):
            out[:, steps] = tokens
            steps += 1
        for row, ids in zip(rows, out[:, :steps].tolist()):
            if eos_token_id is not None and eos_token_id in ids:
                ids = ids[: ids.index(eos_token_id) + 1]
            results[row] = ids
    return results
