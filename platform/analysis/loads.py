"""Per-expert load statistics from three sources, in one format (issue 17 §1).

- **training**: the tokens routed to each expert over a training run, summed by the training loop
  (:mod:`raymoe.platform.train.loop`) and saved in every checkpoint's ``trainer_state.json`` under
  ``expert_loads``. Auxiliary-loss-free balancing pushes them toward uniform on the training
  distribution, but the sum includes the steps before the biases settled;
- **calibration**: :func:`calibrate`, a forward without gradients over a sample of prepared data on
  the local engine (one process), counting every MoE layer's routing: ``raymoe calibrate``, written
  as :data:`~raymoe.platform.checkpoint.layout.LOADS_FILE` beside the checkpoint by default;
- **serving**: the live counts of a serving runner (``/stats`` ``expert_loads``,
  :class:`~raymoe.platform.inference.runner.LiveCounts`), which :meth:`ExpertLoads.from_live` reads.

The JSON (``version`` 1): ``{"version", "source", "layers", "tokens", "loads", "detail"}`` with
``layers`` the model layer ids of the MoE layers in ``moe_by_layer`` order (main layers, then MTP
modules), ``loads[i][e]`` the (token, choice) pairs routed to expert e of layer ``layers[i]`` and
``tokens`` the token rows counted per layer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from raymoe.platform import storage
from raymoe.platform.checkpoint.layout import LOADS_FILE, STATE_FILE, resolve
from raymoe.platform.config import ModelConfig

LOADS_VERSION = 1
SOURCES = ("training", "calibration", "serving")


class LoadsError(ValueError):
    """A loads file or source that is malformed or does not fit the model; the message names it and the field."""


@dataclass
class ExpertLoads:
    """Tokens routed to each expert of each MoE layer (see the module docstring)."""

    layers: list[int]
    loads: torch.Tensor  # [len(layers), E] float64
    tokens: int
    source: str
    detail: dict[str, Any] = field(default_factory=dict)

    def frequency(self) -> torch.Tensor:
        """[L, E] float64: each expert's share of its layer's routed (token, choice) pairs (rows of 0 stay 0)."""
        total = self.loads.sum(-1, keepdim=True)
        return torch.where(total > 0, self.loads / total.clamp_min(1e-300), torch.zeros_like(self.loads))

    def to_dict(self) -> dict[str, Any]:
        return {"version": LOADS_VERSION, "source": self.source, "layers": list(self.layers), "tokens": self.tokens,
                "loads": self.loads.tolist(), "detail": self.detail}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ExpertLoads:
        if not isinstance(d, dict):
            raise LoadsError(f"{where}: expert loads must be a JSON object, got {type(d).__name__}")
        for key in ("version", "source", "layers", "tokens", "loads"):
            if key not in d:
                raise LoadsError(f"{where}: expert loads have no field {key!r}")
        if d["version"] != LOADS_VERSION:
            raise LoadsError(f"{where}: version {d['version']!r}; this raymoe reads version {LOADS_VERSION}")
        if d["source"] not in SOURCES:
            raise LoadsError(f"{where}: source {d['source']!r} is not one of {', '.join(SOURCES)}")
        layers = d["layers"]
        if not isinstance(layers, list) or not all(isinstance(x, int) for x in layers):
            raise LoadsError(f"{where}: layers must be a list of layer ids")
        if not isinstance(d["tokens"], int) or d["tokens"] < 0:
            raise LoadsError(f"{where}: tokens must be a non-negative integer, got {d['tokens']!r}")
        try:
            loads = torch.tensor(d["loads"], dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise LoadsError(f"{where}: loads must be a list of equal-length lists of numbers") from None
        if loads.ndim != 2 or loads.shape[0] != len(layers):
            raise LoadsError(f"{where}: loads must be [{len(layers)} layers, experts], got {list(loads.shape)}")
        if not torch.isfinite(loads).all() or (loads < 0).any():
            raise LoadsError(f"{where}: loads must be finite and non-negative")
        return cls(layers, loads, d["tokens"], d["source"], dict(d.get("detail") or {}))

    def save(self, location: str) -> None:
        storage.write_bytes(location, json.dumps(self.to_dict()).encode())

    @classmethod
    def load(cls, location: str) -> ExpertLoads:
        try:
            raw = storage.read_bytes(location)
        except (OSError, FileNotFoundError) as exc:
            raise LoadsError(f"cannot read expert loads {location}: {exc}") from None
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise LoadsError(f"{location} is not JSON: {exc}") from None
        return cls.from_dict(d, location)

    @classmethod
    def from_live(cls, counts: dict[str, Any], detail: dict | None = None) -> ExpertLoads:
        """From a runner's ``stats()["expert_loads"]`` (``/stats``): source ``serving``."""
        tokens = max(counts["tokens"]) if counts["tokens"] else 0
        return cls(list(counts["layers"]), torch.tensor(counts["loads"], dtype=torch.float64), int(tokens),
                   "serving", detail or {})  # fmt: skip

    def check_against(self, cfg: ModelConfig, where: str) -> None:
        """LoadsError when these are not loads of ``cfg``'s MoE layers and experts."""
        from raymoe.platform.inference.tiers import moe_layers

        if self.loads.shape[1] != cfg.n_routed_experts:
            raise LoadsError(
                f"{where}: expert loads of {self.loads.shape[1]} experts per layer; the model has "
                f"n_routed_experts={cfg.n_routed_experts}"
            )
        want = moe_layers(cfg)
        if self.layers != want:
            raise LoadsError(f"{where}: expert loads of layers {self.layers}; the model's MoE layers are {want}")


def training_loads(location: str) -> ExpertLoads | None:
    """The training run's loads in a training checkpoint's trainer state (None: none there, e.g. HF checkpoints)."""
    resolved = resolve(location)
    if resolved.kind != "training":
        return None
    state_file = storage.join(resolved.location, STATE_FILE)
    try:
        state = json.loads(storage.read_bytes(state_file))
    except (OSError, ValueError):
        return None
    if "expert_loads" not in state:
        return None
    return ExpertLoads.from_dict(state["expert_loads"], f"{state_file} expert_loads")


def loads_file(location: str) -> str:
    """Where a calibration of the checkpoint ``location`` goes by default: beside it."""
    return storage.join(resolve(location).location, LOADS_FILE)


def find_loads(location: str) -> ExpertLoads | None:
    """The checkpoint's statistics: a calibration file beside it, else the training run's, else None."""
    beside = loads_file(location)
    if storage.is_file(beside):
        return ExpertLoads.load(beside)
    return training_loads(location)


@torch.no_grad()
def calibrate(
    location: str,
    data: str,
    batches: int = 8,
    batch_size: int = 8,
    split: str = "train",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> ExpertLoads:
    """Count every MoE layer's routing over ``batches`` × ``batch_size`` sequences of prepared ``data``.

    Runs on the local engine (one process): the model's forward (MTP modules included) with a
    :class:`~raymoe.platform.train.balance.LoadCounter`. The sequences are a seeded random sample of
    ``split``. ValueError (LoadsError, DataError) names a bad argument."""
    from raymoe.platform.checkpoint.reader import load_model
    from raymoe.platform.data.loader import ShardStore, to_batch
    from raymoe.platform.model.forward import loss
    from raymoe.platform.train.balance import LoadCounter

    if batches < 1 or batch_size < 1:
        raise LoadsError(f"batches and batch_size must be >= 1, got {batches} and {batch_size}")
    store = ShardStore(data, split)
    model = load_model(location, dtype=dtype)
    layers = list(model.moe_by_layer())
    if not layers:
        raise LoadsError(f"checkpoint {location} has no MoE layers: there is no routing to count")
    counter = LoadCounter(layers, model.cfg.n_routed_experts)
    counts = torch.zeros(len(layers), model.cfg.n_routed_experts, dtype=torch.float64)  # [L, E]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(store), generator=g)[: batches * batch_size]
    t0 = time.perf_counter()
    tokens = 0
    for chunk in order.split(batch_size):  # the model in ``dtype`` (routers float32), as served
        input_ids, labels = to_batch(store.rows(chunk))
        loss(model, input_ids, labels, mtp_lambda=1.0, hooks=counter)
        counts += counter.loads().double()  # summed in float64: the counter's float32 is exact to 2^24 only
        counter.reset()
        tokens += input_ids.numel()
    detail = {"checkpoint": str(location), "data": str(data), "split": split, "sequences": len(order),
              "dtype": str(dtype).removeprefix("torch."), "seconds": round(time.perf_counter() - t0, 2),
              "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    return ExpertLoads(layers, counts, tokens, "calibration", detail)
