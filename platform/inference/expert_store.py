"""Routed experts held in tiers (:mod:`raymoe.platform.inference.tiers`), answering the one forward's expert calls.

:func:`load_tiered` reads a checkpoint the way the plan says, never the whole model at once: the
model without its routed experts (:func:`~raymoe.platform.checkpoint.reader.load_model`), then per
MoE layer its hot experts stacked in the compute dtype, its warm ones quantized (read a few at a
time), and for its cold ones only where their bytes are. :class:`TieredExperts` is then what
:func:`~raymoe.platform.model.forward.drive` calls at each MoE layer in place of
:func:`~raymoe.platform.model.forward.local_experts`:

1. the hot experts run as the layer's own :class:`~raymoe.platform.model.moe.Experts` would (the
   same code: a shard's ``partial`` call; with every expert hot, the very call plain serving makes);
2. a warm int8 expert in bf16 on the CPU is computed from its codes by the int8 kernel
   (:class:`~raymoe.platform.checkpoint.quant.Int8Linear`), with no copy; every other chosen expert
   is computed from a working copy in the :class:`ExpertCache`: a warm one dequantized, a cold one
   read (memory-mapped safetensors on the CPU; host memory to the device on CUDA). The experts of
   the current call are pinned: nothing evicts them until the call is answered. When the cache
   cannot take a copy (every byte pinned), the copy is used once and dropped: a cold expert is
   slower, never absent;
3. with prefetch, before computing, the next MoE layer's gate is applied to this layer's rows and
   the experts it would choose are made ready in the cache by a background thread (Mixtral-
   offloading's speculative prefetch), as many as fit beside the pinned copies, their room reserved
   and the copies pinned until that layer's call; the prefetch hit
   rate counts how often a chosen expert was ready because of it. ``auto`` turns it on on CUDA
   only: on the 2-core CPU the thread took batch-1 decode of the bench checkpoint at 25 % from 65
   to 25 tokens/s (2026-12-02), a cold read from the page cache costing less than the contention.

Live counts (the tokens routed to each expert, per layer) are kept for ``/stats``. Numbers: an
expert's output depends only on its tier (hot: as stored; warm: its dequantized weights; cold: as
stored), never on what the cache held, so outputs do not change with the traffic.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from raymoe.platform import storage
from raymoe.platform.checkpoint.layout import expert_name
from raymoe.platform.checkpoint.quant import Int8Linear, QuantizedWeight, int8_kernel_available, quantize_weight
from raymoe.platform.checkpoint.reader import Reader, load_into, load_model
from raymoe.platform.checkpoint.sharded import TrainingCheckpoint
from raymoe.platform.checkpoint.tensorfile import DTYPES
from raymoe.platform.inference.tiers import TierPlan
from raymoe.platform.model.forward import ExpertCall
from raymoe.platform.model.moe import Experts, MoE, expert_ffn
from raymoe.platform.model.transformer import DeepseekV3

logger = logging.getLogger(__name__)

Key = tuple[int, int]  # (model layer id, expert)
WARM_READ_EXPERTS = 16  # warm experts read (and quantized) at a time while loading


@dataclass
class _Copy:
    """A working copy of one expert in the compute dtype."""

    gate_up: torch.Tensor
    down: torch.Tensor
    prefetched: bool = False  # made ready by a prefetch and not used since

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


class ExpertCache:
    """Working copies of warm and cold experts under ``capacity`` bytes, evicting by ``lru`` or ``lfu``.

    ``lfu`` evicts the copy of the expert used least often so far (every :meth:`get` of a key counts,
    cached or not). Pinned keys are never evicted. Thread-safe (the prefetch thread inserts)."""

    def __init__(self, capacity: int, eviction: str = "lru") -> None:
        self.capacity = capacity
        self.eviction = eviction
        self.uses: collections.Counter[Key] = collections.Counter()
        self.entries: collections.OrderedDict[Key, _Copy] = collections.OrderedDict()
        self.pinned: collections.Counter[Key] = collections.Counter()
        self.used = 0  # copies held and bytes reserved
        self.reserved: dict[Key, int] = {}  # bytes set aside for copies a prefetch is making
        self.evictions = 0
        self.lock = threading.RLock()

    def get(self, key: Key) -> _Copy | None:
        with self.lock:
            self.uses[key] += 1
            copy = self.entries.get(key)
            if copy is not None:
                self.entries.move_to_end(key)
            return copy

    def has(self, key: Key) -> bool:
        with self.lock:
            return key in self.entries

    def pin(self, keys: list[Key]) -> None:
        with self.lock:
            self.pinned.update(keys)

    def unpin(self, keys: list[Key]) -> None:
        with self.lock:
            self.pinned.subtract(keys)
            self.pinned += collections.Counter()  # drops keys at zero

    def put(self, key: Key, copy: _Copy) -> bool:
        """Keep ``copy`` under ``key``, evicting unpinned copies as needed; False (nothing kept) when it cannot fit."""
        with self.lock:
            self.release(key)
            if key in self.entries:
                return True
            if not self._make_room(copy.nbytes):
                return False
            self.entries[key] = copy
            self.used += copy.nbytes
            return True

    def reserve(self, key: Key, nbytes: int) -> bool:
        """Set ``nbytes`` aside for ``key``'s coming copy (a prefetch), evicting unpinned copies as needed."""
        with self.lock:
            if key in self.entries or key in self.reserved:
                return False
            if not self._make_room(nbytes):
                return False
            self.reserved[key] = nbytes
            self.used += nbytes
            return True

    def release(self, key: Key) -> None:
        """Give back what :meth:`reserve` set aside for ``key`` (if anything)."""
        with self.lock:
            self.used -= self.reserved.pop(key, 0)

    def _make_room(self, nbytes: int) -> bool:
        need = nbytes - (self.capacity - self.used)
        if need <= 0:
            return True
        victims, freed = [], 0
        for k in self._eviction_order():
            if freed >= need:
                break
            victims.append(k)
            freed += self.entries[k].nbytes
        if freed < need:
            return False
        for k in victims:
            self.used -= self.entries.pop(k).nbytes
            self.evictions += 1
        return True

    def _eviction_order(self) -> list[Key]:
        free = [k for k in self.entries if not self.pinned[k]]
        if self.eviction == "lfu":
            return sorted(free, key=lambda k: self.uses[k])  # stable: equal counts go least recently used first
        return free  # OrderedDict order: least recently used first


# --------------------------------------------------------------------------- where cold experts are


class MappedSource:
    """Cold experts read from a local training checkpoint's safetensors files through ``mmap`` (no copy held)."""

    def __init__(self, reader: TrainingCheckpoint) -> None:
        self.reader = reader
        self._maps: dict[str, mmap.mmap] = {}

    def _map(self, location: str) -> mmap.mmap:
        if location not in self._maps:
            fs, path = storage.filesystem(location)
            with open(path, "rb") as f:  # ACCESS_COPY: private and writable (torch.frombuffer), the file untouched
                self._maps[location] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[location]

    def fetch(self, names: list[str]) -> list[torch.Tensor]:
        out = []
        for name in names:
            location, begin, end = self.reader.byte_range(name)
            shape, _ = self.reader.describe(name)
            dtype = DTYPES[self.reader.info(name).dtype]
            view = torch.frombuffer(self._map(location), dtype=dtype, count=(end - begin) // dtype.itemsize,
                                    offset=begin)  # fmt: skip
            out.append(view.view(*shape))
        return out

    def close(self) -> None:
        self._maps.clear()  # the maps close when the last view of them goes


class ReaderSource:
    """Cold experts read through the checkpoint reader on each use (remote, Hugging Face or delta checkpoints)."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader

    def fetch(self, names: list[str]) -> list[torch.Tensor]:
        got = self.reader.read(names)
        return [got[n] for n in names]

    def close(self) -> None:
        pass


class HostSource:
    """Cold experts in the host's memory (pinned), copied to the device on use (CUDA)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def fetch(self, names: list[str]) -> list[torch.Tensor]:
        return [self.tensors[n] for n in names]

    def close(self) -> None:
        self.tensors.clear()


# --------------------------------------------------------------------------- one layer's experts


@dataclass
class _LayerExperts:
    layer: int
    prefix: str  # ``model.layers.3.mlp.experts``
    hot: Experts | None  # the hot experts, stacked (local ids)
    hot_local: torch.Tensor  # [E] the hot local id of every expert, -1 for the others
    warm: dict[int, tuple[QuantizedWeight, QuantizedWeight]]  # warm (and quantized cold) experts
    direct: dict[int, tuple[Int8Linear, Int8Linear]]  # int8 experts computed from their codes (no copy)
    cold: list[int]  # offloaded experts
    n_experts: int

    @property
    def all_hot(self) -> bool:
        return self.hot is not None and self.hot.n_experts == self.n_experts

    def names(self, e: int) -> list[str]:
        return [expert_name(f"{self.prefix}.gate_up_proj", e), expert_name(f"{self.prefix}.down_proj", e)]


class TieredExperts:
    """The answer to a program's :class:`~raymoe.platform.model.forward.ExpertCall` from tiered experts.

    Build it with :func:`load_tiered`. ``stats()`` gives the live counts and the cache's numbers."""

    def __init__(
        self,
        plan: TierPlan,
        layers: dict[int, _LayerExperts],
        gates: dict[int, torch.nn.Module],
        cold_source: Any,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.plan = plan
        self.layers = layers
        self.gates = gates
        self.source = cold_source
        self.dtype, self.device = dtype, device
        self.next_layer: dict[int, int] = {}  # which MoE layer follows which (set_next_layers)
        self.cache = ExpertCache(plan.cache_bytes, plan.config.eviction)
        self.counters: collections.Counter[str] = collections.Counter()
        self.fetch_seconds = 0.0
        wanted = plan.config.prefetch == "on" or (plan.config.prefetch == "auto" and device.type == "cuda")
        self.prefetch = wanted and not plan.all_hot
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "raymoe-prefetch") if self.prefetch else None
        self._pending: dict[Key, concurrent.futures.Future] = {}
        self._prefetch_pins: dict[int, list[Key]] = {}  # per layer: prefetched copies kept until its next call
        self._lock = threading.Lock()

    def set_next_layers(self, next_layer: dict[int, int]) -> None:
        """Which MoE layer follows which in the main model (prefetch looks one ahead)."""
        self.next_layer = dict(next_layer)

    # -- the answer -------------------------------------------------------------------------

    def __call__(self, call: ExpertCall) -> torch.Tensor:
        le = self.layers[call.layer]
        idx, x = call.idx, call.x
        if le.all_hot:
            return le.hot(x, idx, call.weights)
        local = le.hot_local[idx]  # [N, K]
        y = le.hot(x, local, call.weights, partial=True) if le.hot is not None and bool((local >= 0).any()) else None
        y = torch.zeros_like(x) if y is None else y
        others = sorted(set(idx[local < 0].tolist()))
        keys = [(call.layer, e) for e in others if e not in le.direct]
        self.cache.pin(keys)
        with self._lock:  # what was prefetched for this call and is not chosen may go now
            self.cache.unpin(self._prefetch_pins.pop(call.layer, []))
        try:
            if self.prefetch:
                self._prefetch(call)
            for e in others:
                rows, k = (idx == e).nonzero(as_tuple=True)
                xs = x.index_select(0, rows).to(self.dtype)
                if e in le.direct:  # int8 codes through the int8 kernel: no working copy
                    self.counters["direct"] += 1
                    gate_up, down = le.direct[e]
                    gate, up = gate_up(xs).chunk(2, dim=-1)
                    out = down(F.silu(gate) * up)
                else:
                    copy = self._copy(le, e)
                    out = expert_ffn(xs, copy.gate_up, copy.down)
                y.index_add_(0, rows, (out * call.weights[rows, k].unsqueeze(-1).to(self.dtype)).to(y.dtype))
        finally:
            self.cache.unpin(keys)
        return y

    def _copy(self, le: _LayerExperts, e: int) -> _Copy:
        """The working copy of a warm or cold expert: from the cache, a prefetch, or made now."""
        key = (le.layer, e)
        self.counters["uses"] += 1
        with self._lock:
            pending = self._pending.pop(key, None)
        if pending is not None:
            pending.result()  # a prefetch of this expert is under way
        copy = self.cache.get(key)
        if copy is not None:
            self.counters["hits"] += 1
            if copy.prefetched:
                self.counters["prefetch_hits"] += 1
                copy.prefetched = False
            return copy
        self.counters["misses"] += 1
        copy = self._make(le, e)
        if not self.cache.put(key, copy):
            self.counters["uncached"] += 1  # used once, dropped: every cached byte is pinned
        return copy

    def _make(self, le: _LayerExperts, e: int, prefetched: bool = False) -> _Copy:
        t0 = time.perf_counter()
        if e in le.warm:
            gate_up, down = (q.dequantize(self.dtype) for q in le.warm[e])
        else:
            stored = self.source.fetch(le.names(e))
            gate_up, down = (t.to(self.device, self.dtype, non_blocking=True) for t in stored)
            if gate_up.data_ptr() == stored[0].data_ptr():  # still the stored bytes (a view of the map): copy them
                gate_up, down = gate_up.clone(), down.clone()
        self.fetch_seconds += time.perf_counter() - t0
        return _Copy(gate_up.contiguous(), down.contiguous(), prefetched)

    # -- prefetch ---------------------------------------------------------------------------

    def _prefetch(self, call: ExpertCall) -> None:
        """Ask the next MoE layer's gate which experts these rows would choose there, and ready those not hot."""
        nxt = self.next_layer.get(call.layer)
        if nxt is None:
            return
        le = self.layers[nxt]
        _, idx, _ = self.gates[nxt](call.x)
        wanted = sorted(set(idx.reshape(-1).tolist()) - set((le.hot_local >= 0).nonzero().squeeze(1).tolist()))
        for e in wanted:
            if e in le.direct:
                continue
            key = (nxt, e)
            with self._lock:
                if key in self._pending or self.cache.has(key):
                    continue
                if not self.cache.reserve(key, self.plan.expert_bytes["hot"]):
                    break  # no room beside the copies in use: the rest would be made when chosen
                self.cache.pin([key])  # until the next layer's call: this layer's misses must not evict it
                self._prefetch_pins.setdefault(nxt, []).append(key)
                self.counters["prefetched"] += 1
                self._pending[key] = self._pool.submit(self._prefetch_one, le, e)

    def _prefetch_one(self, le: _LayerExperts, e: int) -> None:
        try:
            self.cache.put((le.layer, e), self._make(le, e, prefetched=True))
        except Exception:  # a failed prefetch costs the use a miss, nothing else
            self.cache.release((le.layer, e))
            logger.exception("prefetch of layer %d expert %d failed", le.layer, e)

    # -- numbers ----------------------------------------------------------------------------

    def held_bytes(self) -> dict[str, int]:
        """Bytes of tensors held now: hot experts, warm (quantized) experts, the cache's copies."""
        hot = sum(le.hot.gate_up_proj.nbytes + le.hot.down_proj.nbytes for le in self.layers.values() if le.hot)
        warm = sum(a.nbytes + b.nbytes for le in self.layers.values() for a, b in le.warm.values())
        warm += sum(a.nbytes + b.nbytes for le in self.layers.values() for a, b in le.direct.values())
        return {"hot": hot, "warm": warm, "cache": self.cache.used, "total": hot + warm + self.cache.used}

    def stats(self) -> dict[str, Any]:
        c = self.counters
        uses = c["uses"]
        return {
            "expert_tiers": self.plan.describe(),
            "expert_held_bytes": self.held_bytes(),
            "expert_cache": {
                "capacity_bytes": self.cache.capacity,
                "used_bytes": self.cache.used,
                "entries": len(self.cache.entries),
                "uses": uses,  # warm and cold experts computed from a working copy
                "direct_uses": c["direct"],  # int8 experts computed from their codes
                "hits": c["hits"],
                "misses": c["misses"],
                "uncached": c["uncached"],
                "evictions": self.cache.evictions,
                "hit_rate": c["hits"] / uses if uses else None,
                "prefetched": c["prefetched"],
                "prefetch_hits": c["prefetch_hits"],
                "prefetch_hit_rate": c["prefetch_hits"] / uses if uses and self.prefetch else None,
                "fetch_seconds": self.fetch_seconds,
            },
        }

    def drain(self) -> None:
        """Wait for the prefetches under way (tests and benchmarks, before reading the numbers)."""
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for f in pending:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.source is not None:
            self.source.close()


# --------------------------------------------------------------------------- loading


def _module_names(model: DeepseekV3) -> dict[int, str]:
    """Model layer id -> the qualified name of its MoE module (``model.layers.3.mlp``)."""
    names = {id(m): name for name, m in model.named_modules()}
    return {layer: names[id(moe)] for layer, moe in model.moe_by_layer().items()}


def _cold_source(reader: Reader, device: torch.device) -> Any:
    if device.type != "cpu":
        return HostSource()
    if isinstance(reader, TrainingCheckpoint) and not storage.is_uri(reader.location):
        return MappedSource(reader)
    logger.warning("cold experts of %s are read through its reader on each use (not a local training checkpoint: "
                   "no memory map)", reader.location)  # fmt: skip
    return ReaderSource(reader)


@torch.no_grad()
def load_tiered(
    reader: Reader, plan: TierPlan, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[DeepseekV3, TieredExperts]:
    """The model without routed experts and the :class:`TieredExperts` that answers for them, as ``plan`` says."""
    device = torch.device(device)
    model = load_model(reader, dtype=dtype, device=device, routed_experts=False)
    cfg = model.cfg
    moe = model.moe_by_layer()
    prefixes = _module_names(model)
    if sorted(moe) != sorted(plan.layers):
        raise ValueError(f"the plan's MoE layers {plan.layers} are not the model's {sorted(moe)}")
    source = _cold_source(reader, device) if plan.counts["cold"] and plan.config.cold == "offload" else None
    layers: dict[int, _LayerExperts] = {}
    for layer in plan.layers:
        prefix = f"{prefixes[layer]}.experts"
        hot_ids = plan.ids(layer, "hot")
        hot = None
        if hot_ids:
            hot = Experts(len(hot_ids), cfg.hidden_size, cfg.moe_intermediate_size).to(device=device, dtype=dtype)
            targets = {f"{prefix}.gate_up_proj": hot.gate_up_proj.data, f"{prefix}.down_proj": hot.down_proj.data}
            load_into(targets, reader, {name: hot_ids for name in targets})
            hot.eval().requires_grad_(False)
        local = torch.full((cfg.n_routed_experts,), -1, dtype=torch.long, device=device)
        local[hot_ids] = torch.arange(len(hot_ids), device=device)
        le = _LayerExperts(layer, prefix, hot, local, {}, {}, [], cfg.n_routed_experts)
        quantized = plan.ids(layer, "warm") + (plan.ids(layer, "cold") if plan.config.cold == "quantized" else [])
        for start in range(0, len(quantized), WARM_READ_EXPERTS):
            chunk = quantized[start : start + WARM_READ_EXPERTS]
            got = reader.read([n for e in chunk for n in le.names(e)])
            for e in chunk:
                storage_dtype = plan.config.warm_dtype if e in plan.ids(layer, "warm") else plan.config.cold_dtype
                a, b = (quantize_weight(got[n].float(), storage_dtype, plan.config.group_size) for n in le.names(e))
                a, b = _to(a, device), _to(b, device)
                if storage_dtype == "int8" and int8_kernel_available(dtype, device):
                    le.direct[e] = (Int8Linear(a), Int8Linear(b))  # the codes in the kernel's layout only
                else:
                    le.warm[e] = (a, b)
            del got
        if plan.config.cold == "offload":
            le.cold = plan.ids(layer, "cold")
            if isinstance(source, HostSource) and le.cold:
                got = reader.read([n for e in le.cold for n in le.names(e)])
                source.tensors.update({n: t.to(dtype).pin_memory() for n, t in got.items()})
        layers[layer] = le
    gates = {layer: m.gate for layer, m in moe.items() if isinstance(m, MoE)}
    store = TieredExperts(plan, layers, gates, source, dtype, device)
    main = [b.layer_id for b in model.main_blocks() if isinstance(b.mlp, MoE)]
    store.set_next_layers({a: b for a, b in zip(main, main[1:])})
    return model, store


def _to(q: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    return QuantizedWeight(q.dtype, q.q.to(device), q.scales.to(device), q.cols, q.group_size)


def rss_bytes() -> dict[str, int]:
    """This process's resident memory from ``/proc/self/status``: anonymous (what it allocated) and file-backed
    (mapped files' pages, e.g. memory-mapped cold experts, which the kernel may drop). Empty off Linux."""
    out = {}
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out
