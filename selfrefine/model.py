"""A decoder-only transformer for the Llama family (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2).

Parameter names follow Hugging Face's `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj.weight`, ...)
so that checkpoints load and save without a renaming table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import Attention, KVCache, attention_mask
from .rope import inverse_frequencies, rope_cos_sin
from .token_logps import head_fp32_math, head_token_logps

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 2048
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json keys, kept for saving

    def __post_init__(self) -> None:
        """Refuse values this model cannot run with (`ValueError`, named as in config.json), so a bad config is one
        line at load time instead of a crash or silent NaN later."""
        hf_name = {ours: hf for hf, ours in self._HF_NAMES.items()}

        def bad(name: str, what: str) -> ValueError:
            return ValueError(f"{hf_name.get(name, name)} must be {what}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "max_position_embeddings") + (("head_dim",) if self.head_dim is not None else ()):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not (is_int(v) or isinstance(v, float)) or not math.isfinite(v) or v <= 0:
                raise bad(name, "a finite number > 0")
        for name in ("tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise bad("rope_scaling", "an object or null")
        for name in ("bos_token_id", "pad_token_id"):
            if getattr(self, name) is not None and not is_int(getattr(self, name)):
                raise bad(name, "an integer or null")
        eos = self.eos_token_id
        if eos is not None and not is_int(eos) and not (isinstance(eos, list) and all(is_int(i) for i in eos)):
            raise bad("eos_token_id", "an integer, a list of integers or null")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                                 f"({self.num_heads}), or head_dim given")
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim % 2:
            raise bad("head_dim", "even (rotary embeddings rotate pairs)")

    # Hugging Face config.json <-> ours. Qwen2 always has q/k/v bias; Llama says so in `attention_bias`.
    _HF_NAMES = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                 "num_key_value_heads": "num_kv_heads"}

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
        known = {f for f in cls.__dataclass_fields__}
        kw: dict[str, Any] = {"architecture": arch, "extra": {}}
        for key, value in hf.items():
            name = cls._HF_NAMES.get(key, key)
            if name in known and name not in ("architecture", "extra"):
                kw[name] = value
            elif key != "architectures":
                kw["extra"][key] = value
        kw.setdefault("num_kv_heads", hf["num_attention_heads"])
        if arch == "Qwen2ForCausalLM":
            kw["attention_bias"] = True
        rope = hf.get("rope_parameters")
        if isinstance(rope, dict):  # transformers >= 5 nests rope_theta and the scaling here
            kw.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if not kw.get("rope_scaling") and rope.get("rope_type", "default") != "default":
                kw["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        d = asdict(self)
        extra, arch = d.pop("extra"), d.pop("architecture")
        for hf_name, ours in self._HF_NAMES.items():
            d[hf_name] = d.pop(ours)
        if arch == "Qwen2ForCausalLM":
            d.pop("attention_bias")
        model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}[arch]
        return {**extra, **d, "architectures": [arch], "model_type": model_type, "hidden_act": "silu"}

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as the reference implementation does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """weight * (x / rms(x)), the normalisation in float32 and rounded back to x's dtype before the weight, as
        the reference does; `F.rms_norm` is that float32 math in one kernel (bit-identical on the CPU, tested)
        where it took six, and a decode step runs 61 norms."""
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gate(x), up(x) (`packed_linear` may stand in: one fused product)."""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   cfg.attention_bias, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """`forward(input_ids, positions, key_mask, cache)` -> logits (B, T, vocab).

    - positions (B, T): RoPE positions; default 0..T-1 (or continuing after the cache).
    - key_mask (B, S): which key slots hold real tokens (S = cached + new); None = all real, and
      without a cache the causal flash path of SDPA is used. A (B, 1, T, S) boolean tensor is taken
      as the attention mask itself (the sampler's per-row decode mask over a `SlotCache`).
    - cache: a KVCache from `new_cache`, filled in place and advanced by T.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)
        self.gradient_checkpointing = False

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        ref = self.model.embed_tokens.weight
        return KVCache.empty(c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim, dtype or ref.dtype, ref.device)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      key_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        past = cache.length if cache is not None else 0
        mask = None  # built once here, not in each layer
        if key_mask is not None and key_mask.dim() == 4:  # a ready (B, 1, T, S) mask (the slot sampler's)
            mask = key_mask
        elif key_mask is not None or (past and T > 1):
            if key_mask is None:
                key_mask = torch.ones(B, past + T, dtype=torch.bool, device=input_ids.device)
            mask = attention_mask(key_mask, T)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_at: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
        """`logits_at` (B, T) bool: project only those positions, returning (N, vocab) logits (`scored_logits`:
        in the head's own dtype, float32 in training, even under autocast); or (N,) indices into the B * T
        positions, where one may come twice (a packed pair's last prompt token predicts both answers' first
        tokens, `data.pack_pairs`). With `targets` (N,) as well: their log-probs (N,) in float32
        (`scored_token_logps`), the training losses' input, without (N, vocab) logits. `key_mask` may be a ready
        (B, 1, T, T) bool attention mask."""
        hidden = self.hidden_states(input_ids, positions, key_mask, cache)
        if logits_at is None:
            if targets is not None:
                raise ValueError("targets need logits_at, the positions that predict them")
            return self.lm_head(hidden)
        hidden = hidden[logits_at] if logits_at.dtype == torch.bool else hidden.flatten(0, 1)[logits_at]
        return self.scored_logits(hidden) if targets is None else self.scored_token_logps(hidden, targets)

    def scored_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on (N, hidden) states whose logits feed a log-softmax (the training losses), with autocast
        switched off and the states cast to the head weight's dtype: the float32 master weights give float32
        logits, where autocast would round them to bfloat16 (steps of 1/16 at |logit| 8: a log-prob error of
        that size on every token) before the log-softmax."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.lm_head(hidden.to(self.lm_head.weight.dtype))

    @torch.no_grad()
    def logits_into(self, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """The head's logits of (n, hidden) states written into `out` (n, vocab): straight into it when the head
        has `out`'s dtype, so a decode step allocates no fresh (slots x vocab) tensor (on a CPU a fresh 25 MB one
        faults its pages in again every step); through a cast otherwise (a bfloat16 model, float32 logits). No
        gradient: a buffer the sampler reads."""
        weight = self.lm_head.weight
        if weight.dtype == out.dtype and not torch.is_autocast_enabled(hidden.device.type):
            torch.mm(hidden, weight.t(), out=out)
        else:
            out.copy_(self.lm_head(hidden))

    def scored_token_logps(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets) at (N, hidden) states, from the head's float32 weights with autocast off as in
        `scored_logits`, chunk by chunk (`token_logps`): the same numbers without holding (N, vocab) logits. Under a
        CPU's bf16 autocast its matmuls may take oneDNN's bf16 math mode (`token_logps.head_fp32_math`)."""
        math = head_fp32_math(hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            return head_token_logps(hidden, self.lm_head.weight, targets, math=math)
