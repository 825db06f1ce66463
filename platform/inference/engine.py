"""The serving engine: continuous batching, chunked prefill, the block cache, MTP speculative decoding.

Every :meth:`Engine.step` builds one flat batch from the running sequences: each decoding
sequence feeds its last token (and, with speculation, the MTP module's draft of the token after
it), and sequences still in their prompt feed a chunk of it, up to ``prefill_chunk`` prompt
tokens per step over all of them. Sequences join the running set whenever a slot and their
cache blocks are free, and leave it the step they finish, so the batch changes every step.

A request reserves its cache blocks when it is admitted, for its prompt plus ``max_tokens`` (plus
one draft), so a running sequence never runs out of cache; a request that cannot get them waits,
one that could never fit is refused at :meth:`Engine.submit`, and more than ``max_waiting``
waiting requests are refused there with :class:`EngineOverloaded`.

Speculative decoding (``speculative`` and a checkpoint with MTP modules): after the main model's
forward, the first MTP module runs over the positions the step accepted (hidden state of position
i with the embedding of token i+1, as in training) and its prediction at the last position is the
draft of the token after the next. The next step verifies the draft in the same forward as the
next token; :func:`~raymoe.platform.inference.sampling.accept_draft` keeps it or replaces it.
Greedy output is token-identical to plain decoding; the acceptance rate is in :meth:`stats`.

Failures: a failure in one request's own part of a step (its logits not finite, its sampling, its
text) ends that request alone, with ``finish_reason`` ``"error"``; the engine and the other
requests go on. A failure of the runner (the forward that every request of the step shares, e.g.
an actor of the graph died) ends every request and the engine (:class:`EngineDead`).

The engine is driven by :meth:`step` (tests, benchmarks) or by its own thread (:meth:`start`,
the Serve replica); :meth:`submit` and :meth:`abort` may be called from any thread.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from raymoe.platform.inference.batch import SeqRun, build_step
from raymoe.platform.inference.cache import BlockAllocator
from raymoe.platform.inference.detok import Detokenizer
from raymoe.platform.inference.sampling import (
    SamplingError,
    SamplingParams,
    TokenLogprob,
    accept_draft,
    choose,
    make_generator,
    token_logprob,
)

logger = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """More requests are waiting than the engine is configured to queue (HTTP 503)."""


class RequestError(ValueError):
    """A request the engine cannot serve as asked; ``field`` names the request field at fault, ``code``
    OpenAI's error code where it has one (``context_length_exceeded``)."""

    def __init__(self, field: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.code = code


class NonFiniteLogits(ArithmeticError):
    """The model's logits for one request are NaN or infinite: that request ends with an error."""


class EngineDead(RuntimeError):
    """The engine failed (e.g. an actor of its graph died) and serves no more requests."""


@dataclass
class EngineConfig:
    """Engine limits; the Serve config's ``args`` of the same names set them."""

    max_batch_size: int = 32  # running sequences
    cache_tokens: int = 65536  # latent cache capacity in tokens, all sequences together
    block_size: int = 16
    prefill_chunk: int = 512  # prompt tokens per step over all prefilling sequences
    max_waiting: int = 1024  # requests waiting to be admitted; more are refused (EngineOverloaded)
    speculative: bool = True  # MTP drafts when the model has MTP modules

    def check(self) -> None:
        for name in ("max_batch_size", "cache_tokens", "block_size", "prefill_chunk", "max_waiting"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"engine {name} must be a positive integer, got {value!r}")


@dataclass
class Output:
    """What one step produced for one request: new tokens and text, and whether it finished."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when the request asked


@dataclass
class _Seq:
    id: str
    prompt: list[int]
    params: SamplingParams
    on_output: Callable[[Output], None]
    gen: torch.Generator
    tokens: list[int] = field(default_factory=list)  # prompt + output
    computed: int = 0  # positions of the main model's cache that are valid
    blocks: list[int] = field(default_factory=list)
    draft: int | None = None
    detok: Detokenizer | None = None  # the output's text, decoded incrementally
    sent: int = 0  # characters of that text sent so far
    arrived: float = 0.0

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)


class Engine:
    """Continuous batching over a runner (see the module docstring).

    Args:
        runner: :class:`~raymoe.platform.inference.runner.LocalRunner` or the graph's runner.
        config: limits.
        decode: token ids -> text (the tokenizer's), for stop strings and streamed text; each step decodes only
            its new tokens (:class:`~raymoe.platform.inference.detok.Detokenizer`).
        eos_token_id: a sequence ends after producing it (unless its request ignores EOS).
    """

    def __init__(
        self,
        runner: Any,
        config: EngineConfig,
        decode: Callable[[list[int]], str] | None = None,
        eos_token_id: int | None = None,
    ) -> None:
        config.check()
        self.runner = runner
        self.cfg = runner.cfg
        self.config = config
        self.decode = decode or (lambda ids: "")
        self.eos_token_id = eos_token_id
        self.allocator = BlockAllocator(runner.num_blocks, runner.block_size)
        self.speculative = config.speculative and runner.has_mtp
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: list[_Seq] = []
        self._aborted: set[str] = set()
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.dead: str | None = None
        self.counters = collections.Counter()

    # -- requests (any thread) --------------------------------------------------------------

    def max_model_len(self) -> int:
        return self.cfg.max_position_embeddings

    def tokens_needed(self, prompt_len: int, max_tokens: int) -> int:
        """Cache tokens a request reserves: prompt, output, and one draft position."""
        return prompt_len + max_tokens + (1 if self.speculative else 0)

    def check_request(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise RequestError (naming the field) for a request this engine could never serve."""
        try:
            params.check()  # its seed must fit the generator, etc.
        except SamplingError as exc:
            raise RequestError(exc.field, str(exc)) from None
        if not prompt:
            raise RequestError("prompt", "the prompt is empty; it needs at least one token")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RequestError("prompt", f"token id {bad[0]} is outside the vocabulary (size {self.cfg.vocab_size})")
        limit = self.max_model_len()
        if len(prompt) + params.max_tokens > limit:
            field = "prompt" if len(prompt) >= limit else "max_tokens"
            raise RequestError(
                field,
                f"the prompt's {len(prompt)} tokens plus max_tokens {params.max_tokens} exceed the model's "
                f"context of {limit} tokens",
                code="context_length_exceeded",
            )
        need = self.allocator.blocks_for(self.tokens_needed(len(prompt), params.max_tokens))
        if need > self.allocator.capacity_blocks:
            raise RequestError(
                "max_tokens",
                f"the prompt's {len(prompt)} tokens plus max_tokens {params.max_tokens} need {need} cache blocks; "
                f"the cache holds {self.allocator.capacity_blocks} (cache_tokens {self.config.cache_tokens})",
            )

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_output: Callable[[Output], None],
        request_id: str | None = None,
    ) -> str:
        """Queue a request; ``on_output`` is called (from the engine's thread) with each step's output.

        Raises RequestError for a request that can never be served, EngineOverloaded when
        ``max_waiting`` requests already wait, EngineDead after a fatal failure."""
        self.check_request(prompt, params)
        request_id = request_id or f"req-{next(self._ids)}"
        seq = _Seq(
            id=request_id,
            prompt=list(prompt),
            params=params,
            on_output=on_output,
            gen=make_generator(params.seed),
            tokens=list(prompt),
            arrived=time.perf_counter(),
        )
        with self._lock:
            if self.dead:
                raise EngineDead(self.dead)
            if len(self._waiting) >= self.config.max_waiting:
                self.counters["rejected_overload"] += 1
                raise EngineOverloaded(
                    f"{len(self._waiting)} requests are already waiting (max_waiting {self.config.max_waiting})"
                )
            self._waiting.append(seq)
            self._lock.notify()
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request (its client went away); its cache blocks are freed at the next step."""
        with self._lock:
            self._aborted.add(request_id)
            self._lock.notify()

    # -- state ------------------------------------------------------------------------------

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._aborted)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        proposed = c["draft_proposed"]
        return {
            "running": len(self._running),
            "waiting": len(self._waiting),
            "cache_blocks_used": self.allocator.used_blocks,
            "cache_blocks_total": self.allocator.capacity_blocks,
            "cache_usage": self.allocator.used_blocks / self.allocator.capacity_blocks,
            "speculative": self.speculative,
            "draft_proposed": proposed,
            "draft_accepted": c["draft_accepted"],
            "acceptance_rate": c["draft_accepted"] / proposed if proposed else None,
            "steps": c["steps"],
            "prompt_tokens": c["prompt_tokens"],
            "generated_tokens": c["generated_tokens"],
            "rejected_overload": c["rejected_overload"],
            "request_errors": c["request_errors"],
        }

    # -- the step ---------------------------------------------------------------------------

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and len(self._running) < self.config.max_batch_size:
                seq = self._waiting[0]
                if seq.id in self._aborted:
                    self._waiting.popleft()
                    self._aborted.discard(seq.id)
                    self._emit(seq, [], finished=True, reason="abort")
                    continue
                need = self.tokens_needed(len(seq.prompt), seq.params.max_tokens)
                if not self.allocator.can_allocate(need):
                    break  # first come, first served: later requests wait behind it
                seq.blocks = self.allocator.allocate(need)
                self._running.append(self._waiting.popleft())

    def _drop_aborted(self) -> None:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
        if not aborted:
            return
        keep = []
        for seq in self._running:
            if seq.id in aborted:
                self._finish(seq, "abort")
            else:
                keep.append(seq)
        self._running = keep
        with self._lock:  # still waiting: dropped at admission
            self._aborted |= {s.id for s in self._waiting if s.id in aborted}

    def step(self) -> int:
        """Run one engine step; returns the number of sequences it advanced (0 when idle)."""
        self._drop_aborted()
        self._admit()
        if not self._running:
            return 0
        runs: list[SeqRun] = []
        seqs: list[_Seq] = []
        budget = self.config.prefill_chunk
        for seq in self._running:
            if seq.prefilling:
                if budget == 0:
                    continue
                chunk = seq.prompt[seq.computed : seq.computed + budget]
                budget -= len(chunk)
                runs.append(SeqRun(chunk, seq.computed, seq.blocks))
            else:
                tokens = [seq.tokens[-1]] + ([seq.draft] if seq.draft is not None else [])
                runs.append(SeqRun(tokens, seq.computed, seq.blocks))
            seqs.append(seq)
        batch = build_step(runs, self.runner.block_size, self.runner.naive_min_run)
        starts = [0, *itertools.accumulate(batch.lengths)]
        logit_rows: list[int] = []
        row_counts: list[int] = []  # logit rows of each run: 0 (a chunk inside the prompt), 1, or 2 (with a draft)
        for seq, run, first in zip(seqs, runs, starts):
            end = first + len(run.tokens)
            if seq.prefilling:
                # a chunk that does not finish the prompt predicts nothing; one that does, the first token
                rows = range(end - 1, end) if seq.computed + len(run.tokens) == len(seq.prompt) else range(0)
            else:
                rows = range(first, end)
            logit_rows.extend(rows)
            row_counts.append(len(rows))
        hidden_rows = torch.arange(batch.num_rows) if self.speculative else None
        # the runner's failure is every request's: it propagates and ends the engine (see _loop)
        logits, hidden = self.runner.main(batch, torch.tensor(logit_rows, dtype=torch.long), hidden_rows)
        logits = logits.cpu()  # sampling draws from CPU generators (one per seeded request)
        finite = torch.isfinite(logits).all(-1)  # [R]: one request's NaN or inf is that request's failure
        self.counters["steps"] += 1

        accepted: list[int] = []  # positions of each run now valid in the main cache
        cursor = 0
        for seq, run, n_rows in zip(seqs, runs, row_counts):
            rows = slice(cursor, cursor + n_rows)
            cursor += n_rows
            try:
                accepted.append(self._advance(seq, run, logits[rows], bool(finite[rows].all())))
            except Exception as exc:  # this request's own failure: it ends, the batch goes on
                logger.exception("request %s failed in step %d", seq.id, self.counters["steps"])
                self.counters["request_errors"] += 1
                self._finish(seq, "error", f"generation failed for this request: {type(exc).__name__}: {exc}")
                accepted.append(0)

        if self.speculative:
            self._draft(seqs, runs, accepted, hidden, starts)
        self._running = [s for s in self._running if s.blocks]
        return len(seqs)

    def _advance(self, seq: _Seq, run: SeqRun, logits: torch.Tensor, finite: bool) -> int:
        """One sequence's part of a step after the forward, from its logit rows [0..2, V]: the next tokens
        chosen (a draft verified) and appended. Returns the positions of its run now valid in the main cache."""
        if seq.prefilling:
            seq.computed += len(run.tokens)
            self.counters["prompt_tokens"] += len(run.tokens)
            if seq.prefilling:
                return len(run.tokens)
        if not finite:
            raise NonFiniteLogits("the model's logits for this request are not finite (NaN or inf)")
        if run.start < len(seq.prompt):  # the prompt's last chunk: it predicts the first token
            accepted = len(run.tokens)
            new = [choose(logits[0], seq.params, seq.gen)]
        elif seq.draft is None:
            seq.computed += 1
            accepted = 1
            new = [choose(logits[0], seq.params, seq.gen)]
        else:
            ok, token = accept_draft(logits[0], seq.draft, seq.params, seq.gen)
            self.counters["draft_proposed"] += 1
            if ok:
                self.counters["draft_accepted"] += 1
                new = [token, choose(logits[1], seq.params, seq.gen)]
            else:
                new = [token]
            seq.computed += len(new)
            accepted = len(new)
        seq.draft = None
        top = seq.params.logprobs
        logprobs = None if top is None else [token_logprob(logits[i], t, top) for i, t in enumerate(new)]
        self._append(seq, new, logprobs)
        return accepted

    def _append(self, seq: _Seq, new: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
        """Add the step's new tokens to a sequence, stopping at EOS, max_tokens or a stop string."""
        added: list[int] = []
        reason = None
        for token in new:
            seq.tokens.append(token)
            added.append(token)
            self.counters["generated_tokens"] += 1
            if token == self.eos_token_id and not seq.params.ignore_eos:
                reason = "stop"
                break
            if len(seq.output) >= seq.params.max_tokens:
                reason = "length"
                break
        if seq.detok is None:
            seq.detok = Detokenizer(self.decode)
        searched = len(seq.detok.text)  # a stop string ending before this was found in an earlier step
        seq.detok.add(added)  # decodes the new tokens only; holds back an incomplete UTF-8 character
        if reason is not None:
            seq.detok.flush()
        text = seq.detok.text
        end = len(text)
        stops = seq.params.stop
        if stops:
            hits = [i for i in (text.find(s, max(0, searched - len(s) + 1)) for s in stops) if i >= 0]
            if hits:
                end, reason = min(hits), "stop"
        if reason is None:  # hold back what may still change: a stop string's start
            end = max(end - max((len(s) - 1 for s in stops), default=0), seq.sent)
        delta = text[seq.sent : end]
        seq.sent = end
        kept = logprobs[: len(added)] if logprobs is not None else None
        self._emit(seq, added, finished=reason is not None, reason=reason, text=delta, logprobs=kept)
        if reason is not None:
            self._release(seq)

    def _draft(self, seqs: list[_Seq], runs: list[SeqRun], accepted: list[int], hidden, starts: list[int]) -> None:
        """The MTP module over the positions each run made valid; drafts for the decoding sequences."""
        mtp_runs: list[SeqRun] = []
        rows: list[int] = []
        drafting: list[_Seq] = []
        for seq, run, n, first in zip(seqs, runs, accepted, starts):
            if not seq.blocks:  # finished this step
                continue
            # position i combines the hidden state of i with the embedding of token i+1
            next_tokens = seq.tokens[run.start + 1 : run.start + 1 + n]
            mtp_runs.append(SeqRun(next_tokens, run.start, seq.blocks))
            rows.extend(range(first, first + n))
            drafting.append(seq)
        if not mtp_runs:
            return
        batch = build_step(mtp_runs, self.runner.block_size, self.runner.naive_min_run)
        last = batch.last_rows()
        want = [i for i, seq in enumerate(drafting) if not seq.prefilling]
        logits = self.runner.mtp(batch, hidden.index_select(0, torch.tensor(rows, device=hidden.device)), last[want])
        for j, i in enumerate(want):
            drafting[i].draft = int(logits[j].argmax())

    def _emit(self, seq: _Seq, tokens: list[int], finished: bool, reason: str | None, text: str = "", error=None,
              logprobs: list[TokenLogprob] | None = None):  # fmt: skip
        out = Output(
            request_id=seq.id,
            token_ids=tokens,
            text=text,
            finished=finished,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.output),
            error=error,
            logprobs=logprobs if logprobs is not None else ([] if seq.params.logprobs is not None else None),
        )
        try:
            seq.on_output(out)
        except Exception:  # a consumer's failure must not stop the batch
            logger.exception("output callback of %s failed", seq.id)

    def _release(self, seq: _Seq) -> None:
        if seq.blocks:
            self.allocator.free(seq.blocks)
            seq.blocks = []

    def _finish(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        self._release(seq)
        self._emit(seq, [], finished=True, reason=reason, error=error)

    def fail_all(self, error: str) -> None:
        """End every request with an error (the engine cannot go on)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for seq in self._running + waiting:
            self._finish(seq, "error", error)
        self._running = []

    # -- the engine thread ------------------------------------------------------------------

    def start(self) -> None:
        """Step in a background thread whenever there is work."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="raymoe-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not (self._waiting or self._running or self._aborted):
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as exc:  # the runner failed (a request's own failure ends in step): nothing can be served
                logger.exception("engine step failed")
                with self._lock:
                    self.dead = f"the engine failed: {type(exc).__name__}: {exc}"
                self.fail_all(self.dead)
                return

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.fail_all("the engine shut down")
        self.runner.close()


def run_to_completion(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """Submit prompts and step the engine (in this thread) until all finish; their output token ids."""
    outs: dict[str, list[int]] = {}
    done: set[str] = set()

    def collect(out: Output) -> None:
        outs.setdefault(out.request_id, []).extend(out.token_ids)
        if out.finished:
            done.add(out.request_id)
            if out.error:
                raise RuntimeError(out.error)

    ids = [engine.submit(p, sp, collect) for p, sp in zip(prompts, params)]
    while len(done) < len(ids):
        if engine.step() == 0 and len(done) < len(ids):
            raise RuntimeError("the engine is idle but requests are unfinished")
    return [outs.get(i, []) for i in ids]


def generate(
    model: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    eos_token_id: int | None = None,
    speculative: bool = True,
    block_size: int = 16,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens after each prompt with the serving engine, in this process.

    Greedy when ``temperature`` is 0; each request samples from its own generator seeded by ``seed``
    (None: nondeterministic). A sequence stops after ``eos_token_id`` (included). Returns the new
    tokens of each prompt. RequestError / SamplingError (ValueErrors) name a bad argument."""
    from raymoe.platform.inference.runner import LocalRunner, cache_blocks
    from raymoe.platform.inference.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        ignore_eos=eos_token_id is None,
    )  # fmt: skip
    params.check(model.cfg.max_position_embeddings)
    need = sum(len(p) + max_new_tokens + 1 for p in prompts)
    runner = LocalRunner(model, cache_blocks(need + block_size * len(prompts), block_size), block_size)
    engine = Engine(
        runner,
        EngineConfig(
            max_batch_size=max(len(prompts), 1),
            cache_tokens=need + block_size * len(prompts),
            block_size=block_size,
            speculative=speculative,
        ),  # fmt: skip
        eos_token_id=eos_token_id,
    )
    return run_to_completion(engine, [list(p) for p in prompts], [params] * len(prompts))
