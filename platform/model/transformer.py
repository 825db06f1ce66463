"""The DeepSeek-V3 causal language model: decoder blocks, multi-token prediction, the LM.

Parameter names equal transformers' ``DeepseekV3ForCausalLM`` state dict (``model.layers.N.
self_attn.q_a_proj.weight``, ``model.layers.N.mlp.experts.gate_up_proj``, ...), so its weights
load with ``load_state_dict``; the MTP modules live in ``model.mtp.K`` (a checkpoint stores them as
layer ``num_hidden_layers + K``; ``raymoe.platform.checkpoint`` maps the two).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.platform.config import ModelConfig
from raymoe.platform.model.attention import MLA, LatentCache
from raymoe.platform.model.layers import MLP, RMSNorm, RotaryEmbedding
from raymoe.platform.model.moe import MoE

IGNORE_INDEX = -100


class Block(nn.Module):
    """One decoder layer: pre-norm MLA and a dense MLP (first layers) or a MoE.

    Args:
        cfg: model config.
        layer_id: index of the layer (and of its slot in the latent cache).
        moe: whether the feed-forward is a MoE (else a dense SwiGLU of ``intermediate_size``).
        seq_aux_alpha: sequence-wise balance loss weight of the MoE.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int, moe: bool, seq_aux_alpha: float = 0.0) -> None:
        super().__init__()
        self.self_attn = MLA(cfg, layer_id)
        self.mlp: nn.Module = MoE(cfg, seq_aux_alpha) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        absorbed: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h [B, S, D] -> (h [B, S, D], balance loss of the MoE or None)."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, absorbed)
        x = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoE):
            y, aux = self.mlp(x)
            return h + y, aux
        return h + self.mlp(x), None


class SharedHead(nn.Module):
    """The MTP module's own final norm; the output projection is the model's shared ``lm_head``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(Block):
    """Multi-token prediction module k: ``eh_proj[enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]``, one block.

    Its state dict names (``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` and a decoder
    layer's) are those of DeepSeek-V3's checkpoint layer ``num_hidden_layers + k - 1``.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int, seq_aux_alpha: float = 0.0) -> None:
        super().__init__(cfg, layer_id, moe=cfg.n_routed_experts > 0, seq_aux_alpha=seq_aux_alpha)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def combine(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        """h_prev [B, S, D] (depth k-1), emb_next [B, S, D] (embedding of t_{i+k}) -> [B, S, D]."""
        return self.eh_proj(torch.cat((self.enorm(emb_next), self.hnorm(h_prev)), dim=-1))


class Backbone(nn.Module):
    """Embedding, decoder layers, final norm and the MTP modules (HF's ``model.*``)."""

    def __init__(self, cfg: ModelConfig, seq_aux_alpha: float = 0.0) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(cfg, i, moe=i >= cfg.first_k_dense_replace, seq_aux_alpha=seq_aux_alpha)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + k, seq_aux_alpha) for k in range(cfg.num_nextn_predict_layers)
        )
        self.rotary_emb = RotaryEmbedding(cfg)


@dataclass
class LossOutput:
    """Losses of one training forward; ``loss`` is what backward runs on."""

    loss: torch.Tensor
    main_loss: torch.Tensor
    mtp_loss: torch.Tensor | None
    aux_loss: torch.Tensor | None
    tokens: int


class DeepseekV3(nn.Module):
    """DeepSeek-V3 for causal language modelling (single device, no Ray).

    Args:
        cfg: model config; ``num_nextn_predict_layers`` MTP modules are built.
        seq_aux_alpha: sequence-wise balance loss weight (0 = off).
    """

    def __init__(self, cfg: ModelConfig, seq_aux_alpha: float = 0.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg, seq_aux_alpha)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    # -- construction -----------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int | torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms, zeros for biases.

        Every tensor (every expert of a stacked expert tensor) draws from its own generator,
        seeded by ``seed`` and its name, so a part of the model built elsewhere (an actor's
        stage or expert shard) gets exactly the same values (:func:`init_parameter_`). Without
        a seed, one is drawn from torch's global generator."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        if isinstance(seed, torch.Generator):
            seed = seed.initial_seed()
        for name, p in self.named_parameters():
            init_parameter_(name, p, self.cfg.initializer_range, seed)
        for moe in self.moe_layers():
            moe.gate.e_score_correction_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        """Every MoE layer, main layers first, then the MTP modules'."""
        blocks = list(self.model.layers) + list(self.model.mtp)
        return [b.mlp for b in blocks if isinstance(b.mlp, MoE)]

    @property
    def num_cache_layers(self) -> int:
        return self.cfg.num_hidden_layers + self.cfg.num_nextn_predict_layers

    # -- forward ----------------------------------------------------------------------------

    def positions(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, R/2] of positions start..start+length-1."""
        if start + length > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence reaches position {start + length}, beyond max_position_embeddings "
                f"({self.cfg.max_position_embeddings})"
            )
        rope = self.model.rotary_emb
        return rope.cos[start : start + length], rope.sin[start : start + length]

    def hidden(
        self,
        input_ids: torch.Tensor,
        cache: LatentCache | None = None,
        absorbed: bool | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids [B, S] -> (final-normed hidden states [B, S, D], MoE balance losses)."""
        start = cache.length if cache is not None else 0
        cos, sin = self.positions(start, input_ids.shape[1], input_ids.device)
        h = self.model.embed_tokens(input_ids)
        rope_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        cos, sin = cos.to(rope_dtype), sin.to(rope_dtype)  # once, not once per layer
        aux: list[torch.Tensor] = []
        for layer in self.model.layers:
            h, a = layer(h, cos, sin, cache, absorbed)
            if a is not None:
                aux.append(a)
        return self.model.norm(h), aux

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: LatentCache | None = None,
        absorbed: bool | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, S, V] (float32) of input_ids [B, S]; with a cache, continues from ``cache.length``
        and advances it (the MTP modules are not run)."""
        h, _ = self.hidden(input_ids, cache, absorbed)
        if cache is not None:
            cache.length += input_ids.shape[1]
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h).float()

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, mtp_lambda: float = 0.3) -> LossOutput:
        """Training loss of input_ids [B, S] against labels [B, S] (next tokens; -100 = ignore).

        Main cross-entropy + λ · mean over MTP depths k of the cross-entropy of predicting
        t_{i+k+1} from position i (depth k sees the embedding of t_{i+k} = labels shifted by
        k-1), plus the sequence-wise balance losses when enabled. With ``mtp_lambda`` 0 the MTP
        modules are not run.
        """
        h, aux = self.hidden(input_ids)
        main = F.cross_entropy(self.lm_head(h).float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        total = main
        mtp_loss = None
        if len(self.model.mtp) and mtp_lambda > 0:
            cos, sin = (t.to(h.dtype) for t in self.positions(0, input_ids.shape[1], input_ids.device))
            losses = []
            h_prev = h
            for k, module in enumerate(self.model.mtp, start=1):
                # position i combines h^{k-1}_i with Emb(t_{i+k}) = Emb(labels[i+k-1]) and predicts labels[i+k]
                next_tokens = mtp_input_tokens(labels, k)
                h_k = module.combine(h_prev, self.model.embed_tokens(next_tokens))
                h_k, a = module(h_k, cos, sin)
                if a is not None:
                    aux.append(a)
                target = mtp_targets(labels, k)
                logits = self.lm_head(module.shared_head.norm(h_k)).float()
                losses.append(F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX))
                h_prev = h_k
            mtp_loss = torch.stack(losses).mean()
            total = total + mtp_lambda * mtp_loss
        aux_loss = torch.stack(aux).sum() if aux else None
        if aux_loss is not None:
            total = total + aux_loss
        tokens = int((labels != IGNORE_INDEX).sum())
        return LossOutput(loss=total, main_loss=main, mtp_loss=mtp_loss, aux_loss=aux_loss, tokens=tokens)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> LatentCache:
        """A latent cache for every main layer and MTP module."""
        param = self.lm_head.weight
        return LatentCache(self.cfg, self.num_cache_layers, batch_size, max_len, dtype or param.dtype, param.device)


def _param_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)


@torch.no_grad()
def init_parameter_(name: str, p: torch.Tensor, std: float, seed: int, expert_ids: list[int] | None = None) -> None:
    """Initialize parameter ``name`` (its DeepseekV3 state-dict name) in place, independent of the rest.

    Norm weights are ones, biases zeros, other tensors Normal(0, std) from a generator seeded by
    (``seed``, ``name``). A stacked expert tensor ``...experts.gate_up_proj`` [n, ...] draws each
    expert from its own generator, keyed by the expert's id (``expert_ids[i]``, default ``i``),
    so an expert shard holding experts 11..21 initializes them as the whole model would.
    """
    if name.endswith("norm.weight") or "layernorm" in name:
        p.fill_(1.0)
    elif name.endswith(".bias"):
        p.zero_()
    elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        ids = expert_ids if expert_ids is not None else range(p.shape[0])
        for row, e in zip(p, ids):
            gen = torch.Generator().manual_seed(_param_seed(seed, f"{name}.{e}"))
            row.copy_(torch.empty(row.shape).normal_(0.0, std, generator=gen))
    else:
        gen = torch.Generator().manual_seed(_param_seed(seed, name))
        p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=gen))


def _shift_left(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x [B, S] shifted left by k along S, the last k positions set to ``fill``."""
    if k == 0:
        return x
    out = torch.full_like(x, fill)
    out[:, :-k] = x[:, k:]
    return out


def mtp_input_tokens(labels: torch.Tensor, k: int) -> torch.Tensor:
    """The tokens whose embeddings MTP depth k (1-based) combines: t_{i+k} = labels[i+k-1] (0 past the end)."""
    return _shift_left(labels, k - 1, fill=0).clamp_min(0)


def mtp_targets(labels: torch.Tensor, k: int) -> torch.Tensor:
    """What MTP depth k predicts at position i: t_{i+k+1} = labels[i+k] (ignored past the end)."""
    return _shift_left(labels, k, fill=IGNORE_INDEX)


def moe_prefix(layer: int, num_hidden_layers: int) -> str:
    """State-dict prefix of MoE layer ``layer`` (an MTP module's layer is ``num_hidden_layers + k``)."""
    if layer >= num_hidden_layers:
        return f"model.mtp.{layer - num_hidden_layers}.mlp"
    return f"model.layers.{layer}.mlp"


class StageModel(nn.Module):
    """The non-expert part of layers [start, end) of a :class:`DeepseekV3`, for an attention stage.

    It holds those layers' attention, norms, dense MLPs, gates (with their biases) and shared
    experts, but not their routed experts; the embedding when ``first``; the final norm, the
    output head and the MTP modules when ``last``. Parameter names are the full model's
    (``model.layers.3.self_attn.q_a_proj.weight``), and ``init_weights`` gives them the values
    the full model's ``init_weights`` would.
    """

    def __init__(
        self, cfg: ModelConfig, start: int, end: int, first: bool, last: bool, seq_aux_alpha: float = 0.0
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.start, self.end, self.first, self.last = start, end, first, last
        with torch.device("meta"):  # the routed experts are dropped before any memory is allocated
            self.model = nn.Module()
            if first:
                self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.model.layers = nn.ModuleDict(
                {str(i): Block(cfg, i, moe=i >= cfg.first_k_dense_replace, seq_aux_alpha=seq_aux_alpha)
                 for i in range(start, end)}
            )  # fmt: skip
            if last:
                self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
                self.model.mtp = nn.ModuleDict(
                    {str(k): MTPModule(cfg, cfg.num_hidden_layers + k, seq_aux_alpha)
                     for k in range(cfg.num_nextn_predict_layers)}
                )  # fmt: skip
                self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for block in self.blocks():
            if isinstance(block.mlp, MoE):
                block.mlp.experts = None
        self.to_empty(device="cpu")
        for block in self.blocks():
            if isinstance(block.mlp, MoE):
                block.mlp.gate.e_score_correction_bias.zero_()
                block.mlp.tokens_per_expert.zero_()
        self.model.rotary_emb = RotaryEmbedding(cfg)

    def blocks(self) -> list[Block]:
        """The decoder layers, then the MTP modules."""
        mtp = list(self.model.mtp.values()) if self.last else []
        return list(self.model.layers.values()) + mtp

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        for name, p in self.named_parameters():
            init_parameter_(name, p, self.cfg.initializer_range, seed)
