"""The DeepSeek-V3 causal language model, whole or a part of it: decoder blocks, MTP modules, the LM.

Parameter names equal transformers' ``DeepseekV3ForCausalLM`` state dict (``model.layers.N.
self_attn.q_a_proj.weight``, ``model.layers.N.mlp.experts.gate_up_proj``, ...), so its weights
load with ``load_state_dict``; the MTP modules live in ``model.mtp.K`` (a checkpoint stores them as
layer ``num_hidden_layers + K``; ``raymoe.platform.checkpoint`` maps the two).

A *part* (``layers=(start, end)``) holds layers [start, end) with the full model's names: the
embedding when it starts at layer 0, the final norm, the output head and the MTP modules when it
ends at the last layer, and the routed experts only when ``routed_experts``. The actor graph's
attention stages are parts without routed experts; its expert shards hold
:class:`~raymoe.platform.model.moe.Experts` of the same names. The forward of every path is
:mod:`raymoe.platform.model.forward`.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from raymoe.platform.config import ModelConfig
from raymoe.platform.model.attention import MLA
from raymoe.platform.model.layers import MLP, RMSNorm, RotaryEmbedding
from raymoe.platform.model.moe import MoE


class Block(nn.Module):
    """One decoder layer: pre-norm MLA and a dense MLP (first layers) or a MoE.

    Args:
        cfg: model config.
        layer_id: index of the layer (MTP module k: ``num_hidden_layers + k``).
        moe: whether the feed-forward is a MoE (else a dense SwiGLU of ``intermediate_size``).
        seq_aux_alpha: sequence-wise balance loss weight of the MoE.
        routed_experts: whether a MoE holds its routed experts.
    """

    def __init__(
        self, cfg: ModelConfig, layer_id: int, moe: bool, seq_aux_alpha: float = 0.0, routed_experts: bool = True
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.self_attn = MLA(cfg, layer_id)
        self.mlp: nn.Module = (
            MoE(cfg, seq_aux_alpha, routed_experts) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # its dense parts run torch.compile'd (raymoe.platform.model.forward.compile_regions)
        self.compiled = False


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

    def __init__(self, cfg: ModelConfig, layer_id: int, seq_aux_alpha: float = 0.0, routed_experts: bool = True):
        super().__init__(cfg, layer_id, cfg.n_routed_experts > 0, seq_aux_alpha, routed_experts)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def combine(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        """h_prev [N, D] (depth k-1), emb_next [N, D] (embedding of t_{i+k}) -> [N, D]."""
        return self.eh_proj(torch.cat((self.enorm(emb_next), self.hnorm(h_prev.to(emb_next.dtype))), dim=-1))


class DeepseekV3(nn.Module):
    """DeepSeek-V3 for causal language modelling, or a part of it (single device, no Ray).

    Args:
        cfg: model config; ``num_nextn_predict_layers`` MTP modules are built (on the last part).
        seq_aux_alpha: sequence-wise balance loss weight (0 = off).
        layers: (start, end) of the main layers this part holds; default all of them.
        routed_experts: build the routed experts (False: an attention stage of the actor graph).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        seq_aux_alpha: float = 0.0,
        layers: tuple[int, int] | None = None,
        routed_experts: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.start, self.end = layers if layers is not None else (0, cfg.num_hidden_layers)
        if not 0 <= self.start < self.end <= cfg.num_hidden_layers:
            raise ValueError(f"layers {layers} is not a range of the model's {cfg.num_hidden_layers} layers")
        self.first, self.last = self.start == 0, self.end == cfg.num_hidden_layers
        self.has_routed_experts = routed_experts
        self.model = nn.Module()
        if self.first:
            self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleDict(
            {str(i): Block(cfg, i, i >= cfg.first_k_dense_replace, seq_aux_alpha, routed_experts)
             for i in range(self.start, self.end)}
        )  # fmt: skip
        if self.last:
            self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.model.mtp = nn.ModuleDict(
                {str(k): MTPModule(cfg, cfg.num_hidden_layers + k, seq_aux_alpha, routed_experts)
                 for k in range(cfg.num_nextn_predict_layers)}
            )  # fmt: skip
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.model.rotary_emb = RotaryEmbedding(cfg)

    @classmethod
    def empty(
        cls,
        cfg: ModelConfig,
        seq_aux_alpha: float = 0.0,
        layers: tuple[int, int] | None = None,
        routed_experts: bool = True,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> DeepseekV3:
        """The model (or part) with uninitialized weights on ``device``, built without touching memory first.

        Parameters are ``dtype`` (default float32) except the routers', which stay float32; buffers
        are float32 (the gate biases zero, the RoPE tables computed). Load or initialize it next."""
        with torch.device("meta"):
            model = cls(cfg, seq_aux_alpha, layers, routed_experts)
        model.to_empty(device=device)
        if dtype is not None:
            cast_parameters(model, dtype)
        with torch.no_grad():
            for gate in model.gates():
                gate.e_score_correction_bias.zero_()
        rotary = RotaryEmbedding(cfg)
        model.model.rotary_emb.cos = rotary.cos.to(device)
        model.model.rotary_emb.sin = rotary.sin.to(device)
        return model

    # -- structure --------------------------------------------------------------------------

    def main_blocks(self) -> list[Block]:
        """The part's decoder layers, in order."""
        return list(self.model.layers.values())

    def mtp_modules(self) -> list[MTPModule]:
        """The MTP modules (on the last part; empty elsewhere)."""
        return list(self.model.mtp.values()) if self.last else []

    def blocks(self) -> list[Block]:
        """The decoder layers, then the MTP modules."""
        return self.main_blocks() + self.mtp_modules()

    def moe_layers(self) -> list[MoE]:
        """Every MoE layer of the part, main layers first, then the MTP modules'."""
        return [b.mlp for b in self.blocks() if isinstance(b.mlp, MoE)]

    def moe_by_layer(self) -> dict[int, MoE]:
        """Layer id -> its MoE (an MTP module's layer id is ``num_hidden_layers + k``)."""
        return {b.layer_id: b.mlp for b in self.blocks() if isinstance(b.mlp, MoE)}

    def gates(self) -> list[nn.Module]:
        return [moe.gate for moe in self.moe_layers()]

    @property
    def num_cache_layers(self) -> int:
        return self.cfg.num_hidden_layers + self.cfg.num_nextn_predict_layers

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the matrices (the routers are float32 whatever it is)."""
        return self.model.layers[str(self.start)].self_attn.kv_b_proj.weight.dtype

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
        for gate in self.gates():
            gate.e_score_correction_bias.zero_()

    # -- the forward (raymoe.platform.model.forward, answered by this model's own experts) ----

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V] (float32) of input_ids [B, S] (the whole model; the MTP modules are not run)."""
        from raymoe.platform.model.forward import logits

        return logits(self, input_ids)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, mtp_lambda: float = 0.3, hooks=None):  # noqa: ANN001, ANN201
        """Training loss of input_ids [B, S] against labels [B, S] (next tokens; -100 = ignore); see
        :func:`raymoe.platform.model.forward.loss`."""
        from raymoe.platform.model.forward import loss

        return loss(self, input_ids, labels, mtp_lambda, hooks)


def _param_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)


@torch.no_grad()
def init_parameter_(name: str, p: torch.Tensor, std: float, seed: int, expert_ids: list[int] | None = None) -> None:
    """Initialize parameter ``name`` (its DeepseekV3 state-dict name) in place, independent of the rest.

    Norm weights are ones, biases zeros, other tensors Normal(0, std) from a generator seeded by
    (``seed``, ``name``). A stacked expert tensor ``...experts.gate_up_proj`` [n, ...] draws each
    expert from its own generator, keyed by the expert's id (``expert_ids[i]``, default ``i``),
    so an expert shard holding experts 11..21 initializes them as the whole model would. The values are
    drawn on the CPU (its generators), whatever the parameter's device or torch's default device, so they
    are the same everywhere.
    """
    if name.endswith("norm.weight") or "layernorm" in name:
        p.fill_(1.0)
    elif name.endswith(".bias"):
        p.zero_()
    elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        ids = expert_ids if expert_ids is not None else range(p.shape[0])
        for row, e in zip(p, ids):
            gen = torch.Generator().manual_seed(_param_seed(seed, f"{name}.{e}"))
            row.copy_(torch.empty(row.shape, device="cpu").normal_(0.0, std, generator=gen))
    else:
        gen = torch.Generator().manual_seed(_param_seed(seed, name))
        p.copy_(torch.empty(p.shape, device="cpu").normal_(0.0, std, generator=gen))


def moe_prefix(layer: int, num_hidden_layers: int) -> str:
    """State-dict prefix of MoE layer ``layer`` (an MTP module's layer is ``num_hidden_layers + k``)."""
    if layer >= num_hidden_layers:
        return f"model.mtp.{layer - num_hidden_layers}.mlp"
    return f"model.layers.{layer}.mlp"


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every floating parameter to ``dtype`` except the gates' router weights, which stay float32.

    Buffers are left as they are: the gates' ``e_score_correction_bias`` and the RoPE tables stay
    float32 (bias steps of γ = 0.001 vanish in bf16, and the router's scores decide the routing)."""
    from raymoe.platform.model.moe import Gate

    for module in model.modules():
        target = torch.float32 if isinstance(module, Gate) else dtype
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != target:
                param.data = param.data.to(target)
    return model


def prepare_for_inference(model: DeepseekV3, dtype: torch.dtype = torch.bfloat16) -> DeepseekV3:
    """:func:`cast_parameters` to ``dtype`` and eval mode (in place; returns the model)."""
    return cast_parameters(model, dtype).eval()
