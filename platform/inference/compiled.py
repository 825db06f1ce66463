"""A runner whose small steps (decode, decode + draft) run as one ``torch.compile``d graph of the one forward.

:class:`~raymoe.platform.inference.runner.LocalRunner` runs a step eagerly; at batch 1 a decode token
costs hundreds of tiny ops and the step is bound by their overhead, not by arithmetic.
:class:`CompiledLocalRunner` compiles the same program (:func:`~raymoe.platform.model.forward.drive`
of :func:`~raymoe.platform.model.forward.main_program` over a
:class:`~raymoe.platform.model.attention.PagedAttention`, answered by the model's own experts) for
steps of at most ``max_rows`` rows and runs of at most ``max_run`` tokens, where every row takes the
absorbed path. Under compilation the experts take their gathered form (no data-dependent shapes)
and the kernels' switch takes the torch paths, so the graph has no breaks. Rows, keys and logit
rows are padded to a canonical form so that one graph serves every such step; larger steps (prefill
chunks) run eagerly through the parent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.fx.experimental._config

from raymoe.platform.inference.batch import SeqRun, StepBatch, build_step
from raymoe.platform.inference.runner import LocalRunner
from raymoe.platform.model.attention import PagedAttention
from raymoe.platform.model.forward import drive, head, main_program, mtp_program
from raymoe.platform.model.transformer import DeepseekV3

logger = logging.getLogger(__name__)


def _no_duck_sizing():
    """Sizes that happen to be equal (rows and keys at batch 2) must not become one symbol, or a later
    step where they differ would compile again (a trace-time setting, so scoped to the call)."""
    return torch.fx.experimental._config.patch(use_duck_shape=False)


class CompiledLocalRunner(LocalRunner):
    """:class:`LocalRunner` whose steps of <= ``max_rows`` rows and runs of <= ``max_run`` tokens are compiled.

    Args:
        model, num_blocks, block_size, cache_dtype: as :class:`LocalRunner`.
        max_rows: the largest step (rows N) run by the compiled graph; larger ones run eagerly.
        max_run: the longest run compiled: 1 is decode, 2 decode with an MTP draft.
        backend: ``torch.compile``'s backend; ``None`` runs the same padded functions eagerly (tests of
            the padding), ``"eager"`` only traces them (tests that one graph serves all steps).
        warmup: compile in the constructor (see :meth:`warmup`); otherwise at the first step.
    """

    def __init__(
        self,
        model: DeepseekV3,
        num_blocks: int,
        block_size: int,
        cache_dtype: torch.dtype | None = None,
        *,
        max_rows: int = 8,
        max_run: int = 2,
        backend: str | None = "inductor",
        warmup: bool = True,
    ) -> None:
        if max_rows < 2 or not 1 <= max_run <= block_size:
            raise ValueError(f"max_rows must be >= 2 and max_run in [1, block_size], got {max_rows}, {max_run}")
        super().__init__(model, num_blocks, block_size, cache_dtype, count=False)  # counting would break the graph
        self.max_rows, self.max_run = max_rows, max_run
        main_fn: Callable = self._main_step
        mtp_fn: Callable = self._mtp_step
        if backend is not None:
            torch._dynamo.mark_static(self.cache.flat)
            main_fn = torch.compile(main_fn, backend=backend, dynamic=True, fullgraph=True)
            mtp_fn = torch.compile(mtp_fn, backend=backend, dynamic=True, fullgraph=True)
        self._main_fn, self._mtp_fn = main_fn, mtp_fn
        self.compile_seconds = 0.0
        self.compiled_steps = 0
        if backend is not None and warmup:
            self.warmup()

    # -- the compiled functions: the one forward over padded tensors ---------------------------

    def _context(self, positions, slots, key_slots, key_valid, block_table, seq_lens) -> PagedAttention:  # noqa: ANN001
        return PagedAttention(
            kv=self.cache.flat, layer_base=self.cache.layer_base, positions=positions, slots=slots,
            absorbed_rows=None, absorbed_runs=[], key_slots=key_slots, key_valid=key_valid,
            block_table=block_table, seq_lens=seq_lens, block_size=self.block_size,
        )  # fmt: skip

    def _main_step(self, tokens, positions, slots, key_slots, key_valid, block_table, seq_lens, logit_rows):  # noqa: ANN001, ANN202
        ctx = self._context(positions, slots, key_slots, key_valid, block_table, seq_lens)
        h = drive(main_program(self.model, ctx, tokens=tokens), self._experts)
        return head(self.model, h.index_select(0, logit_rows)), h

    def _mtp_step(self, tokens, positions, slots, key_slots, key_valid, block_table, seq_lens, hidden, logit_rows):  # noqa: ANN001, ANN202
        ctx = self._context(positions, slots, key_slots, key_valid, block_table, seq_lens)
        module = self.model.mtp_modules()[0]
        emb = self.model.model.embed_tokens(tokens)
        h = drive(mtp_program(module, self.model, hidden, emb, ctx), self._experts)
        return head(self.model, h.index_select(0, logit_rows), module.shared_head.norm)

    # -- the runner interface ---------------------------------------------------------------

    def compiles(self, batch: StepBatch) -> bool:
        """Whether ``batch`` runs through the compiled graph (else the eager parent)."""
        return batch.num_rows <= self.max_rows and max(batch.lengths) <= self.max_run and not batch.naive_runs

    def _pad(self, batch: StepBatch, logit_rows: torch.Tensor, hidden: torch.Tensor | None = None) -> list:
        """The step's tensors padded to the graph's canonical form, so that one graph serves every step.

        Rows, logit rows and block-table columns are padded to at least 2 (a size of 1 would be
        specialized into a graph of its own), keys to a whole number of cache blocks. A padding row is
        token 0 at position 0 writing and reading slot 0 (the padding block, never read by a real row)."""
        batch_keys, batch_valid = batch.padded_keys()  # one graph for every step: static shapes need padding
        N, T = batch.num_rows, batch_keys.shape[1]
        n = max(N, 2)
        t = max(-(-T // self.block_size) * self.block_size, 2)
        device = batch.tokens.device

        def rows(x: torch.Tensor, fill: int = 0) -> torch.Tensor:
            out = torch.full((n, *x.shape[1:]), fill, dtype=x.dtype, device=device)
            out[:N] = x
            return out

        max_blocks = batch.block_table.shape[1]
        block_table = torch.zeros(n, max(max_blocks, 2), dtype=torch.int32, device=device)
        block_table[:N, :max_blocks] = batch.block_table
        key_slots = torch.zeros(n, t, dtype=torch.long, device=device)
        key_slots[:N, :T] = batch_keys
        key_valid = torch.zeros(n, t, dtype=torch.bool, device=device)
        key_valid[:, 0] = True
        key_valid[:N, :T] = batch_valid
        inputs = [rows(batch.tokens), rows(batch.positions), rows(batch.slots), key_slots, key_valid,
                  block_table, rows(batch.seq_lens, fill=1)]  # fmt: skip
        if hidden is not None:
            inputs.append(rows(hidden))
        L = logit_rows.shape[0]
        padded_rows = torch.zeros(max(L, 2), dtype=torch.long, device=device)
        padded_rows[:L] = logit_rows
        return inputs + [padded_rows]

    @torch.inference_mode()
    def main(
        self, batch: StepBatch, logit_rows: torch.Tensor, hidden_rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.compiles(batch):
            return super().main(batch, logit_rows, hidden_rows)
        self.compiled_steps += 1
        batch, logit_rows, hidden_rows = self._on_device(batch, logit_rows, hidden_rows)
        with _no_duck_sizing():
            logits, h = self._main_fn(*self._pad(batch, logit_rows))
        logits = logits[: logit_rows.shape[0]]
        return logits, (h.index_select(0, hidden_rows) if hidden_rows is not None else None)

    @torch.inference_mode()
    def mtp(self, batch: StepBatch, hidden: torch.Tensor, logit_rows: torch.Tensor) -> torch.Tensor:
        if not self.compiles(batch):
            return super().mtp(batch, hidden, logit_rows)
        self.compiled_steps += 1
        batch, logit_rows, hidden = self._on_device(batch, logit_rows, hidden)
        with _no_duck_sizing():
            logits = self._mtp_fn(*self._pad(batch, logit_rows, hidden))
        return logits[: logit_rows.shape[0]]

    def warmup(self) -> float:
        """Compile every graph a step can need (see :meth:`compiles`); returns and logs the seconds it took."""
        start = time.perf_counter()
        # two one-token runs in the padding block, padded like any step: every size is symbolic from
        # the first trace, so later steps reuse this graph
        batch = build_step([SeqRun([0], 0, [0]) for _ in range(2)], self.block_size)
        rows = torch.arange(batch.num_rows)
        _, hidden = self.main(batch, rows, rows)
        if self.has_mtp:
            self.mtp(batch, hidden, rows)
        self.cache.kv[:, 0].zero_()
        self.compile_seconds += time.perf_counter() - start
        logger.info("compiled the decode step in %.1f s", self.compile_seconds)
        return self.compile_seconds
