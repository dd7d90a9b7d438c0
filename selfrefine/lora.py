"""Low-rank adaptation (Hu et al., 2021), written out by hand: y = W x + b + (alpha / r) * B A dropout(x).

Design: `LoRALinear` *is* an `nn.Linear` (a subclass that takes over the wrapped layer's own `weight` and
`bias` Parameters) plus two extra Parameters `lora_A` (r, in) and `lora_B` (out, r). So a LoRA model's
`state_dict` keeps every original name (`...q_proj.weight`) and only adds `...q_proj.lora_A` / `.lora_B`;
code that reads base weights by name keeps working, and nothing is copied.

Master weights: `lora_A` / `lora_B` are float32 even when the base is bfloat16. The LoRA path casts its
input up and its output back down, so the optimizer updates full-precision adapter weights while the
frozen base runs in its own dtype. Cast the model's dtype *before* `inject_lora` (`model.to(bfloat16)` would
cast the adapter too).

The DPO reference model is the same module with the adapter switched off (`adapter_disabled`): the frozen
base weights *are* the reference, so no second copy of the model is kept.

Adapters are saved in PEFT's format (`adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight`, and `adapter_config.json`), so `peft.PeftModel.from_pretrained`
loads them onto the `transformers` model of the same weights, and PEFT's LoRA adapters load here.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .errors import UserError, fail
from .files import atomic_write, read_json, write_json
from .fingerprint import file_digest

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MERGES = "merged_adapters.json"  # in a merged model directory: the adapters already in its weights
PEFT_PREFIX = "base_model.model."
# PEFT LoraConfig options we do not implement, with the value that means "off".
_UNSUPPORTED = {"bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
                "modules_to_save": None, "layers_to_transform": None, "exclude_modules": None,
                "layer_replication": None, "rank_pattern": {}, "alpha_pattern": {}}


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __post_init__(self) -> None:
        if not (isinstance(self.r, int) and self.r >= 1):
            fail(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            fail(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            fail(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            fail(f"LoRA targets must be a non-empty list of module names, got {self.targets!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def lora_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout of the LoRA input: each element zeroed with probability about p, the rest scaled up so the
    expectation is x. On a CPU, `F.dropout` draws one float per element from a serial Mersenne Twister: 18% of a
    demo SFT step on 2 cores (7 masks per layer). Here one 64-bit draw serves four elements, 16 bits each, 3x
    faster: an element drops when its bits fall below round(p * 2^16), so p is rounded to a multiple of 2^-16
    (0.05 -> 0.0500031) and the kept elements are scaled by 1 / (1 - that). Elsewhere `F.dropout` (a fused kernel)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    span = 1 << 16  # each element's bits: one int16 lane of a 64-bit draw
    cut = min(round(p * span), span - 1)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # every 64-bit value
    drop = bits.view(torch.int16)[:x.numel()].view(x.shape) < cut - span // 2  # int16 lanes: -2^15 .. 2^15 - 1
    return (x * (span / (span - cut))).masked_fill_(drop, 0)


class LoRALinear(nn.Linear):
    """y = base(x) + (dropout(x) @ A^T @ B^T) * alpha / r, with the base weight and bias frozen.

    Built from an existing `nn.Linear`, whose Parameters it adopts (see the module docstring for why
    it subclasses `nn.Linear`). A is Kaiming-uniform (a = sqrt(5), as `nn.Linear` and PEFT do), B is
    zero, so a fresh adapter changes nothing. Dropout applies to the LoRA path's input only.

    `merge()` folds (alpha / r) B A into the base weight for adapter-free inference speed; while merged
    the LoRA path is skipped, and the adapter can be neither trained nor switched off until `unmerge()`.
    The fold is computed in float32 but stored in the base dtype, so on a bfloat16 base unmerge is not exact.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: adopt base's tensors instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.r, self.alpha, self.dropout, self.scaling = r, alpha, dropout, alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.enabled, self.merged = True, False

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A in float32: what the adapter adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer's own product (`packed_linear` may stand in for it at inference)."""
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled or self.merged:
            return out
        h = lora_dropout(x, self.dropout, self.training).to(self.lora_A.dtype)
        return out + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged or not self.enabled:
            raise RuntimeError("merge: adapter is already merged or switched off")
        self.weight.copy_(self.weight.float() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("unmerge: adapter is not merged")
        self.weight.copy_(self.weight.float() - self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, dropout={self.dropout}"


def _find_targets(model: nn.Module, cfg: LoRAConfig, source: str | os.PathLike | None = None) -> list[tuple[str, nn.Linear]]:
    """The `nn.Linear` modules LoRA wraps: names equal to or ending in `.<target>` (PEFT's rule).

    Every target must match something (a typo would otherwise train nothing), and a linear layer whose
    weight is tied to an embedding (a tied `lm_head`) is refused: merging into it would change the input
    embeddings too.
    """
    modules = list(model.named_modules())
    if any(isinstance(m, LoRALinear) for _, m in modules):
        fail("the model already has LoRA adapters", source)
    tied = {id(m.weight) for _, m in modules if isinstance(m, nn.Embedding)}
    found, matched = [], set()
    for name, module in modules:
        hits = {t for t in cfg.targets if name == t or name.endswith("." + t)}
        if not hits:
            continue
        if not isinstance(module, nn.Linear):
            fail(f"LoRA target {name!r} is a {type(module).__name__}, not nn.Linear", source)
        if id(module.weight) in tied:
            fail(f"LoRA target {name!r} shares its weight with an embedding (tied output head)", source)
        found.append((name, module))
        matched |= hits
    for target in cfg.targets:
        if target not in matched:
            fail(f"LoRA target module {target!r} matches no module in the model", source)
    return found


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every target linear layer in a `LoRALinear`; freeze all other parameters. Returns the wrapped names."""
    targets = _find_targets(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in targets:
        # A new module starts in train mode; keep the wrapped layer's mode (no dropout in an eval model).
        _replace(model, name, LoRALinear(linear, cfg.r, cfg.alpha, cfg.dropout).train(linear.training))
    return [name for name, _ in targets]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their `model.state_dict()` names (`<module>.lora_A`, `<module>.lora_B`)."""
    out = {}
    for name, m in _lora_modules(model):
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = m.lora_A.detach(), m.lora_B.detach()
    return out


def set_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    layers = _lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters")
    if any(m.merged for _, m in layers):
        raise RuntimeError("cannot switch a merged adapter on or off; unmerge_lora first")
    for _, m in layers:
        m.enabled = enabled


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The frozen base model (the DPO reference) for the duration of the block; restores the previous state.

    Raises on a model without adapters, where "the reference" would silently be the policy itself.
    """
    before = {m: m.enabled for _, m in _lora_modules(model)}
    set_adapter_enabled(model, False)
    try:
        yield model
    finally:
        for m, enabled in before.items():
            m.enabled = enabled


def merge_lora(model: nn.Module) -> None:
    for _, m in _lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in _lora_modules(model):
        m.unmerge()


@torch.no_grad()
def merge_rounding(model: nn.Module, dtype: torch.dtype) -> float:
    """How much a merge saved in `dtype` disturbs the adapters' change: ||round(W + dW) - (W + dW)|| / ||dW|| over
    every adapted layer, the rounding error as a share of the change itself (above 1: more noise than change). A
    small learning rate's delta can sit below bf16's resolution of the base weights (the CPU demo's DPO adapter:
    merged into bf16 weights, its model scored 45.0% instead of 53.7%), and the saved model would then be mostly the
    model before training."""
    error = change = 0.0
    for _, m in _lora_modules(model):
        delta = m.delta_weight()
        exact = m.weight.float() + delta
        error += (exact.to(dtype).float() - exact).pow(2).sum().item()
        change += delta.pow(2).sum().item()
    return (error / change) ** 0.5 if change else 0.0


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight and put a plain `nn.Linear` back (same Parameters, in place).

    The result has exactly the original `state_dict` keys. Parameters stay frozen as `inject_lora` left them.
    """
    for name, m in _lora_modules(model):
        if not m.merged:
            m.merge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        _replace(model, name, plain)
    return model


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, cfg: LoRAConfig,
                 base_model: str | os.PathLike | None = None) -> None:
    """Write `adapter_model.safetensors` and `adapter_config.json` (PEFT format), each atomically. `base_model`
    (the directory it was trained on, recorded as an absolute path) lets `AutoPeftModelForCausalLM` find it offline."""
    layers = _lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters")
    if any((m.r, m.alpha) != (cfg.r, cfg.alpha) for _, m in layers):
        raise ValueError(f"the model's adapters do not match the config (r={cfg.r}, alpha={cfg.alpha})")
    tensors = {}
    for name, m in layers:
        for part in ("lora_A", "lora_B"):
            tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(m, part).detach().cpu().contiguous()
    out_dir = Path(out_dir)
    with atomic_write(out_dir / ADAPTER_WEIGHTS, "wb") as f:
        f.write(save_safetensors(tensors, metadata={"format": "pt"}))
    write_json(out_dir / ADAPTER_CONFIG, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": list(cfg.targets), **_UNSUPPORTED,
        "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": str(Path(base_model).resolve()) if base_model is not None else None,
    })


def read_adapter_config(adapter_dir: str | os.PathLike) -> LoRAConfig:
    """Parse a PEFT `adapter_config.json`, refusing LoRA variants this implementation does not compute."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    raw = read_json(path)
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        fail("not a LoRA adapter config (peft_type must be \"LORA\")", path)
    for key, off in _UNSUPPORTED.items():
        if raw.get(key, off) not in (off, None):  # PEFT writes null for several of these when unused
            fail(f"unsupported LoRA option {key}={raw[key]!r} (only {off!r} is implemented)", path)
    targets = raw.get("target_modules")
    if not isinstance(targets, list):
        fail(f"target_modules must be a list of module names, got {targets!r}", path)
    try:
        return LoRAConfig(r=raw.get("r"), alpha=raw.get("lora_alpha"), dropout=raw.get("lora_dropout", 0.0),
                          targets=tuple(targets))
    except (UserError, TypeError) as e:
        fail(getattr(e, "message", str(e)), path)


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> LoRAConfig:
    """Inject LoRA with the saved config and load the saved weights. Checks everything before touching the model."""
    cfg = read_adapter_config(adapter_dir)
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        fail("file not found", path)
    try:
        tensors = load_safetensors(path.read_bytes())
    except Exception as e:  # safetensors raises several types for a corrupt file
        fail(f"cannot read safetensors file: {e}", path)
    expected = {}
    for name, linear in _find_targets(model, cfg, Path(adapter_dir) / ADAPTER_CONFIG):
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (cfg.r, linear.in_features)
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (linear.out_features, cfg.r)
    for key in sorted(set(tensors) - set(expected)):
        fail(f"tensor {key!r} matches no LoRA target module in the model", path)
    for key, shape in expected.items():
        if key not in tensors:
            fail(f"tensor {key!r} is missing", path)
        if tuple(tensors[key].shape) != shape:
            fail(f"tensor {key!r} has shape {tuple(tensors[key].shape)}, the model needs {shape}", path)
        if not bool(torch.isfinite(tensors[key]).all()):  # as `load_model` refuses NaN weights
            fail(f"tensor {key!r} has non-finite values (NaN or inf)", path)
    inject_lora(model, cfg)
    with torch.no_grad():
        for name, m in _lora_modules(model):
            m.lora_A.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            m.lora_B.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    return cfg


def _merges(model_dir: str | os.PathLike) -> list[dict]:
    path = Path(model_dir) / MERGES
    return read_json(path)["merged"] if path.exists() else []


def record_merge(merged_dir: str | os.PathLike, base_dir: str | os.PathLike, adapter_dir: str | os.PathLike) -> None:
    """Say in `merged_dir` which adapters its weights hold: those of `base_dir`, then `adapter_dir` (by its weights'
    content, so a copy of the adapter is recognised too)."""
    entry = {"adapter": str(Path(adapter_dir).resolve()), "into": str(Path(base_dir).resolve()),
             "adapter_weights_digest": file_digest(Path(adapter_dir) / ADAPTER_WEIGHTS)}
    write_json(Path(merged_dir) / MERGES, {"merged": [*_merges(base_dir), entry]})


def refuse_merged_twice(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike) -> None:
    """An adapter applied on a model that already has it merged would count twice, silently: refuse."""
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    merged = {m["adapter_weights_digest"]: m for m in _merges(model_dir)}
    if merged and weights.is_file() and (m := merged.get(file_digest(weights))):  # hash only if there is a record
        fail(f"this adapter is already merged into {model_dir} (from {m['adapter']}, recorded in {MERGES}): "
             "applying it again would count it twice", adapter_dir)
