"""Fine-tuning a MoE: what trains, ESFT's expert selection, the routing metrics of every step.

Four methods (``finetune.method``, :class:`~raymoe.platform.config.FinetuneConfig`):

- ``full``: every parameter trains;
- ``frozen-router``: every parameter but the gates' weights (``...mlp.gate.weight``);
- ``esft-token`` / ``esft-gate`` (Wang et al., arXiv 2407.01906): per MoE layer (MTP modules
  included) only the experts ``finetune.experts`` names train; attention, the router, the shared
  experts, the dense layers, embeddings, norms and the head are frozen.

ESFT selects the experts on a sample of the fine-tuning data. Per MoE layer ``l`` and expert ``i``,
over the sample's N routed tokens with top-K routing:

- token-selection ratio ``r_i = (1/N) Σ_t 1[i ∈ topK(t)] / K``;
- average gate score ``g_i = (1/N) Σ_t w_{t,i} / Σ_k w_{t,k}`` (``w_{t,i}`` the gate weight, 0 when
  not chosen; normalized per token, so that DeepSeek-V3's scaled weights also sum to 1).

Both sum to 1 over the experts. The layer's selection is the smallest set of experts, highest score
first (ties: lower id first), whose scores sum to at least ``top_p``. The sequences are equally
long, so these are the paper's per-sequence averages.

Every trainer applies the same rule to the parameters it holds (:func:`restrict`): the local engine,
each attention stage and each expert shard of the actor graph (a shard that holds no selected
expert has nothing to optimize and takes no optimizer step). :class:`FinetuneTrainer` wraps a
trainer and adds the routing metrics of each step and the loss on a general held-out set.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from raymoe.platform.analysis.capture import RoutingRecord
from raymoe.platform.analysis.metrics import effective_experts
from raymoe.platform.checkpoint.layout import is_stacked_expert
from raymoe.platform.config import ConfigError, FinetuneConfig, RaymoeConfig
from raymoe.platform.train.trainer import StepMetrics

logger = logging.getLogger(__name__)

ESFT_METHODS = {"esft-token": "token", "esft-gate": "gate"}
_MOE_PARAM_RE = re.compile(r"^model\.(layers|mtp)\.(\d+)\.mlp\.")
GATE_WEIGHT_SUFFIX = ".mlp.gate.weight"


# -- ESFT's selection --------------------------------------------------------------------------


def expert_scores(records: list[RoutingRecord], n_experts: int, kind: str) -> dict[int, torch.Tensor]:
    """ESFT's score of every expert of every recorded MoE layer: {layer: [E] float64, summing to 1}.

    ``kind`` is ``token`` (token-selection ratio) or ``gate`` (average gate score); rows an MTP depth
    has no target for are not counted."""
    if kind not in ("token", "gate"):
        raise ValueError(f"kind must be 'token' or 'gate', got {kind!r}")
    sums: dict[int, torch.Tensor] = {}
    rows: dict[int, int] = {}
    for rec in records:
        for layer, routing in rec.layers.items():
            _, _, valid = rec.tokens(layer)
            idx, w = routing.idx[valid], routing.weights[valid].double()
            if kind == "token":
                share = torch.full_like(w, 1.0 / idx.shape[-1])
            else:
                share = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
            total = sums.setdefault(layer, torch.zeros(n_experts, dtype=torch.float64))
            total.index_add_(0, idx.reshape(-1), share.reshape(-1))
            rows[layer] = rows.get(layer, 0) + idx.shape[0]
    return {layer: s / max(rows[layer], 1) for layer, s in sorted(sums.items())}


def select_experts(scores: dict[int, torch.Tensor], top_p: float) -> dict[int, list[int]]:
    """Per layer, the smallest set of experts, highest score first, whose scores sum to at least ``top_p``."""
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"finetune.top_p must be in (0, 1], got {top_p}")
    out = {}
    for layer, s in scores.items():
        order = sorted(range(s.numel()), key=lambda e: (-float(s[e]), e))
        chosen, total = [], 0.0
        for e in order:
            chosen.append(e)
            total += float(s[e])
            if total >= top_p * (1 - 1e-9):
                break
        out[layer] = sorted(chosen)
    return out


# -- what trains -------------------------------------------------------------------------------


def moe_layer_of(name: str, num_hidden_layers: int) -> int | None:
    """The MoE layer id of a parameter of a MoE block (``model.layers.3.mlp.…`` -> 3, ``model.mtp.0.mlp.…`` -> L)."""
    m = _MOE_PARAM_RE.match(name)
    if m is None:
        return None
    return int(m.group(2)) + (num_hidden_layers if m.group(1) == "mtp" else 0)


def trained_rows(
    name: str, rows: int, f: FinetuneConfig, num_hidden_layers: int, expert_ids: list[int] | None = None
) -> bool | torch.Tensor:
    """Whether parameter ``name`` trains under ``f``: True, False, or (a stacked expert tensor of ``rows``
    experts, global ids ``expert_ids``, default 0..rows-1) a bool mask of the rows that do."""
    if f.method == "full":
        return True
    if f.method == "frozen-router":
        return not name.endswith(GATE_WEIGHT_SUFFIX)
    if not is_stacked_expert(name):
        return False
    selected = set(f.experts.get(str(moe_layer_of(name, num_hidden_layers)), []))
    ids = expert_ids if expert_ids is not None else list(range(rows))
    mask = torch.tensor([e in selected for e in ids], dtype=torch.bool)
    if bool(mask.all()):
        return True
    return mask if bool(mask.any()) else False


def restrict(
    named_params: list[tuple[str, torch.nn.Parameter]],
    cfg: RaymoeConfig,
    expert_ids: dict[str, list[int]] | None = None,
) -> int:
    """Freeze, in place, what ``cfg.finetune`` does not train: ``requires_grad`` off, or for a stacked
    expert tensor trained in some rows, a gradient hook that zeroes the other rows and its ``row_mask``
    (for the optimizer's weight decay). Call before the optimizer is built. Returns the trained elements."""
    f = cfg.finetune
    if f.method in ESFT_METHODS and not f.experts:
        raise ConfigError(f"finetune.method={f.method} needs finetune.experts (the selection); none given")
    trained = 0
    for name, p in named_params:
        rule = trained_rows(name, p.shape[0] if p.ndim else 1, f, cfg.model.num_hidden_layers,
                            (expert_ids or {}).get(name))  # fmt: skip
        if rule is True:
            trained += p.numel()
            continue
        if rule is False:
            p.requires_grad_(False)
            continue
        mask = rule.to(p.device)
        p.row_mask = mask
        keep = mask.view(-1, *([1] * (p.ndim - 1))).to(p.dtype)
        p.register_hook(lambda g, keep=keep: g * keep.to(g.dtype))
        trained += int(mask.sum()) * p[0].numel()
    return trained


# -- the metrics of a fine-tuning step ---------------------------------------------------------


def routing_metrics(loads: torch.Tensor, names: list[str], dead_fraction: float) -> dict[str, float]:
    """Expert usage, dead experts and effective experts per MoE layer from a step's loads [L, E].

    - ``usage``: the fraction of experts that got any token;
    - ``dead``: experts whose load is below ``dead_fraction`` × the uniform load (mean);
    - ``effective``: exp of the entropy of the load distribution (E when uniform, 1 when one expert)."""
    out: dict[str, float] = {}
    for name, row in zip(names, loads.float()):
        if row.sum() <= 0:
            continue
        out[f"experts/usage/{name}"] = float((row > 0).float().mean())
        out[f"experts/dead/{name}"] = float((row < dead_fraction * row.mean()).sum())
        out[f"experts/effective/{name}"] = effective_experts(row)
    for key in ("usage", "dead", "effective"):
        vals = [v for k, v in out.items() if k.startswith(f"experts/{key}/")]
        if vals:
            out[f"experts/{key}/mean"] = sum(vals) / len(vals)
    return out


class FinetuneTrainer:
    """A trainer (local or graph) whose every step also reports what fine-tuning does to the routing.

    Adds to each step's ``extra`` (logged to MLflow by the training loop): per MoE layer expert usage,
    dead experts and effective experts (:func:`routing_metrics`), and every ``general_every`` steps
    (and after the last) ``general/loss``, the main loss on ``general`` batches: forgetting. All else is
    the wrapped trainer's.

    Args:
        inner: the trainer.
        cfg: the run's config (``finetune`` section, ``train.steps``).
        general: (input_ids, labels) batches of a general held-out set (empty: none).
        layer_names: a name per MoE layer, in the loads' order (MTP named).
    """

    def __init__(self, inner: Any, cfg: RaymoeConfig, general: list, layer_names: list[str]) -> None:
        self.inner = inner
        self.cfg = cfg
        self.general = general
        self.layer_names = layer_names
        self.general_losses: dict[int, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def general_loss(self) -> float:
        return self.inner.evaluate(self.general)[0]

    def train_step(self, micro_batches: list) -> StepMetrics:
        m = self.inner.train_step(micro_batches)
        f = self.cfg.finetune
        m.extra.update(routing_metrics(m.loads, self.layer_names, f.dead_fraction))
        done = m.step + 1
        if self.general and ((f.general_every and done % f.general_every == 0) or done == self.cfg.train.steps):
            self.general_losses[done] = self.general_loss()
            m.extra["general/loss"] = self.general_losses[done]
        return m


# -- one fine-tune, end to end -----------------------------------------------------------------


def trained_parameters(cfg: RaymoeConfig) -> tuple[int, int]:
    """(trained, total) parameter counts of ``cfg.model`` under ``cfg.finetune`` (the model built on meta)."""
    from raymoe.platform.model.transformer import DeepseekV3

    with torch.device("meta"):
        model = DeepseekV3(cfg.model)
    trained = total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        rule = trained_rows(name, p.shape[0] if p.ndim else 1, cfg.finetune, cfg.model.num_hidden_layers)
        if rule is True:
            trained += p.numel()
        elif rule is not False:
            trained += int(rule.sum()) * p[0].numel()
    return trained, total


def sample_batches(data_dir: str, sequences: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``sequences`` sequences of the training split of prepared data, as (input_ids, labels) batches."""
    from raymoe.platform.data.loader import iter_batches

    out, n = [], 0
    for ids, labels in iter_batches(data_dir, "train", batch_size=batch_size):
        take = min(ids.shape[0], sequences - n)
        out.append((ids[:take], labels[:take]))
        n += take
        if n >= sequences:
            break
    return out


def select_for(cfg: RaymoeConfig, records: list[RoutingRecord]) -> tuple[dict[str, list[int]], dict[int, list[float]]]:
    """ESFT's selection from the routing of the sample: (``finetune.experts``, the scores by layer)."""
    scores = expert_scores(records, cfg.model.n_routed_experts, ESFT_METHODS[cfg.finetune.method])
    chosen = select_experts(scores, cfg.finetune.top_p)
    return {str(layer): ids for layer, ids in chosen.items()}, {layer: s.tolist() for layer, s in scores.items()}
