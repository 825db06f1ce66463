"""Where the model's pieces live in the actor graph: layers on stages, (layer, expert) on shards.

A :class:`Placement` is data: the driver builds the actors from it, a checkpoint records it, and a
new one can be computed when a shard is lost or added (experts then move with their optimizer
state). Splits may be uneven: 32 experts on 3 shards are 11 + 11 + 10.

By default the experts of one layer go to shards in contiguous blocks, so the experts of a routing
group (``n_group`` groups of consecutive experts) sit together and group-limited routing sends each
token to few shards. :func:`balanced_placement` instead spreads them by their measured loads (from a
checkpoint, a calibration or live serving counts; :mod:`raymoe.platform.analysis.loads`), and for
serving may give the hottest experts extra copies on other shards (EPLB's redundant experts): the
tokens that choose a replicated expert are split among its copies (:class:`ExpertRouting`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.platform.config import ConfigError, ModelConfig, ParallelConfig, RaymoeConfig


def split_evenly(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous blocks of ``n`` items, the first ``n % parts`` one larger."""
    if parts <= 0:
        raise ValueError(f"cannot split into {parts} parts")
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class Placement:
    """Layers → stages and (MoE layer, expert) → expert shards.

    Args:
        num_layers: main decoder layers; the MTP modules (layers ``num_layers + k``) always sit
            on the last stage, with the final norm and the output head.
        stage_bounds: per stage, its [start, end) range of main layers.
        moe_layers: indices of the MoE layers (main layers, then MTP modules).
        expert_shards: per MoE layer (in ``moe_layers`` order), the shard of each expert (its first copy).
        ep: number of expert shards.
        replicas: per MoE layer, the extra copies ``(expert, shard)`` of replicated experts (serving
            only; empty: none anywhere).
    """

    num_layers: int
    stage_bounds: tuple[tuple[int, int], ...]
    moe_layers: tuple[int, ...]
    expert_shards: tuple[tuple[int, ...], ...]
    ep: int
    replicas: tuple[tuple[tuple[int, int], ...], ...] = ()

    def __post_init__(self) -> None:
        if self.replicas and len(self.replicas) != len(self.moe_layers):
            raise ValueError(f"replicas name {len(self.replicas)} MoE layers, the placement has {len(self.moe_layers)}")
        for i, layer in enumerate(self.moe_layers):
            shards = self.expert_shards[i]
            if any(not 0 <= s < self.ep for s in shards):
                raise ValueError(f"layer {layer}: an expert is placed on a shard outside 0..{self.ep - 1}")
            for e, s in self.replicas[i] if self.replicas else ():
                if not (0 <= e < len(shards) and 0 <= s < self.ep):
                    raise ValueError(f"layer {layer}: replica ({e}, {s}) names no expert or shard")
            holders = self.holders(layer)
            if any(len(set(h)) != len(h) for h in holders):
                raise ValueError(f"layer {layer}: an expert has two copies on one shard")

    @property
    def pp(self) -> int:
        return len(self.stage_bounds)

    def stage_of(self, layer: int) -> int:
        """The stage that owns ``layer`` (an MTP layer belongs to the last stage)."""
        if layer >= self.num_layers:
            return self.pp - 1
        for stage, (start, end) in enumerate(self.stage_bounds):
            if start <= layer < end:
                return stage
        raise ValueError(f"layer {layer} is not in the placement ({self.num_layers} layers)")

    def shard_of(self, layer: int, expert: int) -> int:
        """The expert shard that holds (the first copy of) ``expert`` of MoE layer ``layer``."""
        return self.expert_shards[self.moe_layers.index(layer)][expert]

    def holders(self, layer: int) -> list[tuple[int, ...]]:
        """Per expert of MoE layer ``layer``, the shards that hold a copy of it (first copy first)."""
        i = self.moe_layers.index(layer)
        out = [[s] for s in self.expert_shards[i]]
        for e, s in self.replicas[i] if self.replicas else ():
            out[e].append(s)
        return [tuple(h) for h in out]

    def experts_on(self, shard: int, layer: int) -> list[int]:
        """The experts of MoE layer ``layer`` that shard ``shard`` holds a copy of, ascending."""
        return [e for e, h in enumerate(self.holders(layer)) if shard in h]

    @property
    def num_replicas(self) -> int:
        """Extra expert copies over all MoE layers."""
        return sum(len(r) for r in self.replicas)

    def routing(self, layer: int) -> ExpertRouting:
        """Where the choices of MoE layer ``layer`` go: each expert's copies and their index on each shard."""
        holders = self.holders(layer)
        width = max(len(h) for h in holders)
        shards = torch.full((len(holders), width), -1, dtype=torch.long)
        local = torch.full_like(shards, -1)
        for k in range(self.ep):
            for j, e in enumerate(self.experts_on(k, layer)):
                c = holders[e].index(k)
                shards[e, c], local[e, c] = k, j
        return ExpertRouting(shards, local, torch.tensor([len(h) for h in holders]))

    def to_dict(self) -> dict:
        """JSON-serializable form (checkpoints record it)."""
        return {
            "num_layers": self.num_layers,
            "stage_bounds": [list(b) for b in self.stage_bounds],
            "moe_layers": list(self.moe_layers),
            "expert_shards": [list(s) for s in self.expert_shards],
            "ep": self.ep,
            "replicas": [[list(r) for r in layer] for layer in self.replicas],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Placement:
        return cls(
            num_layers=d["num_layers"],
            stage_bounds=tuple(tuple(b) for b in d["stage_bounds"]),
            moe_layers=tuple(d["moe_layers"]),
            expert_shards=tuple(tuple(s) for s in d["expert_shards"]),
            ep=d["ep"],
            replicas=tuple(tuple(tuple(r) for r in layer) for layer in d.get("replicas", ())),
        )


@dataclass(frozen=True)
class ExpertRouting:
    """One MoE layer's expert copies as lookup tables: ``shards``/``local`` [E, R] (the shard of copy c of
    expert e and its index among that shard's experts; -1 past ``copies[e]``), ``copies`` [E].

    The choices of a replicated expert are split among its copies by row: row i's choice of expert e
    goes to copy ``(i + e) % copies[e]``, so a batch's rows spread evenly over the copies and different
    experts do not all start at their first copy. A row's output does not depend on the copy (the
    copies hold the same weights)."""

    shards: torch.Tensor
    local: torch.Tensor
    copies: torch.Tensor

    def assign(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shard [N, K], index on that shard [N, K]) of every choice ``idx`` [N, K]."""
        shards, local, copies = (t.to(idx.device) for t in (self.shards, self.local, self.copies))
        if shards.shape[1] == 1:
            return shards[idx, 0], local[idx, 0]
        rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
        c = (rows + idx) % copies[idx]
        return shards[idx, c], local[idx, c]


def build_placement(model: ModelConfig, parallel: ParallelConfig) -> Placement:
    """Contiguous, as-even-as-possible stages of layers and blocks of experts per shard."""
    if parallel.pp > model.num_hidden_layers:
        raise ConfigError(
            f"parallel.pp ({parallel.pp}) is more than model.num_hidden_layers ({model.num_hidden_layers})"
        )
    if parallel.ep > model.n_routed_experts:
        raise ConfigError(f"parallel.ep ({parallel.ep}) is more than model.n_routed_experts ({model.n_routed_experts})")
    bounds, start = [], 0
    for size in split_evenly(model.num_hidden_layers, parallel.pp):
        bounds.append((start, start + size))
        start += size
    moe_layers = tuple(range(model.first_k_dense_replace, model.num_hidden_layers)) + tuple(
        model.num_hidden_layers + k for k in range(model.num_nextn_predict_layers)
    )
    blocks = [
        shard for shard, size in enumerate(split_evenly(model.n_routed_experts, parallel.ep)) for _ in range(size)
    ]
    return Placement(
        num_layers=model.num_hidden_layers,
        stage_bounds=tuple(bounds),
        moe_layers=moe_layers,
        expert_shards=tuple(tuple(blocks) for _ in moe_layers),
        ep=parallel.ep,
    )


def balanced_placement(
    model: ModelConfig, parallel: ParallelConfig, loads: torch.Tensor, redundant: int = 0
) -> Placement:
    """Experts on shards by their measured loads, each shard's share of the tokens as even as the loads allow.

    Args:
        model, parallel: the stages are :func:`build_placement`'s; ``parallel.ep`` shards.
        loads: [MoE layers, E] tokens routed to each expert (main layers, then MTP modules: the
            :class:`~raymoe.platform.analysis.loads.ExpertLoads` order); a layer of zeros is placed
            as if uniform.
        redundant: extra copies per MoE layer (serving; 0 for training): each goes to the expert whose
            load per copy is highest, and a replicated expert's tokens are split among its copies.

    Per layer: the copies, heaviest first (load / copies of its expert, ties by expert id), each go
    to the shard with the least load so far that has room (at most ceil((E + redundant) / ep)
    copies a shard) and no copy of that expert yet (the greedy "longest processing time" rule). So
    every shard holds about the same number of experts, and the same function computes the
    placement for a given ``loads`` every time (a resumed run gets the same one).
    """
    base = build_placement(model, parallel)
    E, ep = model.n_routed_experts, parallel.ep
    if loads.shape != (len(base.moe_layers), E):
        raise ConfigError(f"expert loads are {list(loads.shape)}; the model's MoE layers and experts are "
                          f"[{len(base.moe_layers)}, {E}]")  # fmt: skip
    if not 0 <= redundant <= E * (ep - 1):
        raise ConfigError(f"redundant experts must be 0..{E * (ep - 1)} (E x (ep - 1)) with ep={ep}, got {redundant}")
    cap = -(-(E + redundant) // ep)
    primaries, extras = [], []
    for row in loads.to(torch.float64):
        w = row if float(row.sum()) > 0 else torch.ones(E, dtype=torch.float64)
        copies = [1] * E
        for _ in range(redundant):  # the next copy goes where it halves the most load
            e = max((e for e in range(E) if copies[e] < ep), key=lambda e: (float(w[e]) / copies[e], -e))
            copies[e] += 1
        items = sorted(((float(w[e]) / copies[e], e) for e in range(E) for _ in range(copies[e])),
                       key=lambda it: (-it[0], it[1]))  # fmt: skip
        shard_load, shard_n = [0.0] * ep, [0] * ep
        holders: list[list[int]] = [[] for _ in range(E)]
        for share, e in items:
            k = min((k for k in range(ep) if shard_n[k] < cap and k not in holders[e]),
                    key=lambda k: (shard_load[k], shard_n[k], k))  # fmt: skip
            holders[e].append(k)
            shard_load[k] += share
            shard_n[k] += 1
        primaries.append(tuple(h[0] for h in holders))
        extras.append(tuple((e, k) for e in range(E) for k in holders[e][1:]))
    return Placement(num_layers=base.num_layers, stage_bounds=base.stage_bounds, moe_layers=base.moe_layers,
                     expert_shards=tuple(primaries), ep=ep,
                     replicas=tuple(extras) if redundant else ())  # fmt: skip


def shard_loads(placement: Placement, loads: torch.Tensor) -> torch.Tensor:
    """[MoE layers, ep]: the tokens each shard would compute under ``placement`` for ``loads`` [layers, E],
    a replicated expert's load split evenly among its copies (as :class:`ExpertRouting` splits a batch)."""
    out = torch.zeros(len(placement.moe_layers), placement.ep, dtype=torch.float64)
    for i, layer in enumerate(placement.moe_layers):
        for e, h in enumerate(placement.holders(layer)):
            for k in h:
                out[i, k] += float(loads[i, e]) / len(h)
    return out


def imbalance(per_shard: torch.Tensor) -> float:
    """max/mean tokens per shard of [layers, ep] counts: sum over layers of the busiest shard's tokens over the
    sum of the mean (each layer's dispatch waits for its busiest shard). 1.0 is perfectly even."""
    mean = float(per_shard.mean(1).sum())
    return float(per_shard.max(1).values.sum()) / mean if mean > 0 else 1.0


def placement_for(cfg: RaymoeConfig) -> Placement:
    """The training graph's placement: ``parallel.expert_placement`` contiguous (default) or balanced by the
    expert loads of ``parallel.expert_loads`` (a loads JSON) or, when empty, of ``train.init_from``'s checkpoint."""
    p = cfg.parallel
    if p.expert_placement == "contiguous":
        return build_placement(cfg.model, p)
    from raymoe.platform.analysis.loads import ExpertLoads, LoadsError, find_loads

    source = p.expert_loads or cfg.train.init_from
    if not source:
        raise ConfigError("parallel.expert_placement=balanced needs expert loads: set parallel.expert_loads "
                          "(a loads JSON) or train.init_from (a checkpoint with loads)")  # fmt: skip
    try:
        stats = ExpertLoads.load(source) if p.expert_loads else find_loads(source)
        if stats is None:
            raise LoadsError(f"{source} has no expert loads (no calibration file beside it, no training loads); "
                             f"run raymoe calibrate --checkpoint {source} --data D")  # fmt: skip
        stats.check_against(cfg.model, source)
    except LoadsError as exc:
        raise ConfigError(f"parallel.expert_placement=balanced: {exc}") from None
    return balanced_placement(cfg.model, p, stats.loads)


def relabel_like(new: Placement, old: Placement) -> Placement:
    """``new`` with each layer's shard labels permuted so that as many expert copies as possible stay where
    ``old`` has them (shards are interchangeable: the permutation changes no shard's load, only what moves).

    Greedy matching, per layer: the (new shard, old shard) pair that shares the most experts first."""
    shards, extras = [], []
    for i, layer in enumerate(new.moe_layers):
        held_new = [set(new.experts_on(k, layer)) for k in range(new.ep)]
        held_old = [set(old.experts_on(k, layer)) for k in range(old.ep)]
        pairs = sorted(((len(a & b), -j, -k) for j, a in enumerate(held_new) for k, b in enumerate(held_old)),
                       reverse=True)  # fmt: skip
        label: dict[int, int] = {}
        for _, j, k in pairs:
            j, k = -j, -k
            if j not in label and k not in label.values():
                label[j] = k
        shards.append(tuple(label[s] for s in new.expert_shards[i]))
        extras.append(tuple((e, label[s]) for e, s in (new.replicas[i] if new.replicas else ())))
    return Placement(num_layers=new.num_layers, stage_bounds=new.stage_bounds, moe_layers=new.moe_layers,
                     expert_shards=tuple(shards), ep=new.ep,
                     replicas=tuple(extras) if new.replicas else ())  # fmt: skip


def moves(new: Placement, old: Placement) -> int:
    """Expert copies that ``new`` puts on a shard that ``old`` does not hold them on."""
    return sum(len(set(new.experts_on(k, layer)) - set(old.experts_on(k, layer)))
               for layer in new.moe_layers for k in range(new.ep))  # fmt: skip
