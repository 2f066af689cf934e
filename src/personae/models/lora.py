"""Low-rank adapters (LoRA) on the decoder's Linear layers, and adapter files in safetensors.

`add_decoder_lora(model, rank, alpha)` (through `add_lora`) swaps the decoder's linear layers named
by the LoRA targets for :class:`LoRALinear` in place, so parameter names stay predictable::

    decoder.blocks.0.attn.qkv.base.weight   (the frozen-or-not base Linear, renamed under .base)
    decoder.blocks.0.attn.qkv.lora_A        (rank, in_features)
    decoder.blocks.0.attn.qkv.lora_B        (out_features, rank), zeros: the adapter starts as a no-op

The targets are `model.lora_targets` when set, else the decoder's defaults (:func:`lora_targets_of`):
personae's own decoder `attn.qkv`, `attn.proj`, `mlp.fc`, `mlp.proj`; a Hugging Face LM (under
`decoder.lm.`) the attention projections of its family (`HF_LORA_TARGETS`). A target matches a layer
whose dotted name is it or ends with `.<target>`, as PEFT's `target_modules` do. GPT-2's
`transformers` `Conv1D` layers (weight stored (in, out), transposed) are wrapped like Linear ones.

Checkpoints: a model with LoRA has different `state_dict` keys from one without. A run that
carries LoRA stores its rank and alpha in its config and rebuilds the model with `add_lora` before
loading the weights (the adapters' initialisation is meta-learned, so it must survive a reload);
`merge_lora` folds the adapters back into plain Linear layers for export or serving one character.
An adapter file (`adapters/<character>.safetensors`) holds only the adapted tensors, keyed by
parameter name, with string metadata; `apply_adapter` copies them into a model.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from personae.errors import PersonaeError
from personae.files import atomic_path

LORA_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")  # personae's own decoder
LORA_MARKERS = ("lora_A", "lora_B")
HF_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # Llama, Qwen2, Gemma, Mistral, ...
# a Hugging Face LM's default targets by config.model_type (others: HF_ATTENTION_TARGETS)
HF_LORA_TARGETS = {"gpt2": ("c_attn", "c_proj")}  # GPT-2's fused qkv and its output (attention and MLP)


class AdapterError(PersonaeError):
    """An adapter file or LoRA request does not fit the model; the message names the key."""


def routed_low_rank(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    rows: torch.Tensor) -> torch.Tensor:
    """x (B, ..., in) through per-row adapters: banks A (n, r, in), B (n, out, r), rows (B,) -> (B, ..., out)."""
    if rows.shape[0] != x.shape[0]:
        raise AdapterError(f"adapter routing has {rows.shape[0]} rows for a batch of {x.shape[0]}")
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
    low = torch.bmm(flat, lora_A[rows].transpose(1, 2))  # (B, T, r)
    out = torch.bmm(low, lora_B[rows].transpose(1, 2))  # (B, T, out)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _conv1d_type() -> type | None:
    """transformers' Conv1D (GPT-2's linear layers) when transformers is loaded: a model holding one loaded it."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_linear(module: nn.Module) -> bool:
    """Whether LoRA can wrap the module: an nn.Linear, or transformers' Conv1D."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


class LoRALinear(nn.Module):
    """y = base(x) + (x A^T B^T) * alpha / rank, with B = 0 at the start (a no-op adapter).

    `base` is an nn.Linear or a transformers Conv1D (`fan_in_fan_out`: its weight is (in, out)).
    """

    def __init__(self, base: nn.Module, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        if not is_linear(base):
            raise AdapterError(f"LoRALinear wraps an nn.Linear or a transformers Conv1D, got {type(base).__name__}")
        if rank < 1:
            raise AdapterError(f"LoRA rank must be >= 1, got {rank}")
        self.base, self.rank, self.alpha = base, rank, float(alpha)
        self.scaling = self.alpha / rank
        weight = base.weight
        self.fan_in_fan_out = not isinstance(base, nn.Linear)
        self._in, self._out = (weight.shape[0], weight.shape[1]) if self.fan_in_fan_out else (weight.shape[1], weight.shape[0])
        self.lora_A = nn.Parameter(torch.empty(rank, self._in, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.empty(self._out, rank, device=weight.device, dtype=weight.dtype))
        self.reset_adapter()
        # set by AdapterBank.route: (A bank (n, r, in), B bank (n, out, r), slot per row or one slot)
        self.routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor | int] | None = None

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A drawn afresh from the global RNG, B = 0: the adapter is a no-op again."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and the LoRA paper's code
        self.lora_B.zero_()

    @property
    def in_features(self) -> int:
        return int(self._in)

    @property
    def out_features(self) -> int:
        return int(self._out)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A laid out as the base's weight ((out, in); (in, out) for a Conv1D)."""
        delta = self.scaling * self.lora_B @ self.lora_A  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None:  # adapters chosen per row by an AdapterBank
            bank_A, bank_B, rows = self.routing
            if isinstance(rows, int):
                low_rank = F.linear(F.linear(x, bank_A[rows]), bank_B[rows])
            else:
                low_rank = routed_low_rank(x, bank_A, bank_B, rows)
            return self.base(x) + low_rank * self.scaling
        low_rank = F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., out)
        return self.base(x) + low_rank * self.scaling

    def merged(self) -> nn.Module:
        """A plain layer of the base's type computing the same function (W + scaling * B A)."""
        layer = copy.deepcopy(self.base)
        with torch.no_grad():
            layer.weight.add_(self.delta_weight())
        return layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _matches(name: str, targets: Iterable[str], layers: Iterable[str]) -> bool:
    in_target = any(name == t or name.startswith(t + ".") for t in targets)
    return in_target and any(_names_layer(name, layer) for layer in layers)


def _names_layer(name: str, layer: str) -> bool:
    """Whether `layer` (a LoRA target) names the module `name`: equal, or its dotted suffix (as PEFT matches)."""
    return name == layer or name.endswith("." + layer)


def _set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, child)


def _unknown_targets(linear: Sequence[str], layers: Sequence[str], targets: Sequence[str]) -> str:
    """The error text for LoRA targets that name no linear layer: they, and the linear layers there are."""
    missing = [layer for layer in layers if not any(_names_layer(name, layer) for name in linear)]
    short = sorted({name.rsplit(".", 1)[-1] for name in linear})
    there = ", ".join(short) if short else "none"
    return (f"LoRA target(s) {', '.join(missing)} (model.lora_targets) name no linear layer under "
            f"{', '.join(targets)}; its linear layers are named: {there} (a target is a layer's name or the "
            "end of its dotted path, e.g. self_attn.q_proj)")


def add_lora(model: nn.Module, targets: Iterable[str] = ("decoder",), rank: int = 4, alpha: float = 8.0,
             layers: Iterable[str] = LORA_LAYERS) -> list[str]:
    """Replace the linear layers named `layers` under the `targets` submodules by LoRALinear; their names.

    Every entry of `layers` must name at least one linear layer (an error lists the ones there are).
    """
    targets, layers = tuple(targets), tuple(layers)
    wrapped = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    if wrapped:
        raise AdapterError(f"the model already has LoRA layers (e.g. {wrapped[0]}); add_lora runs once")
    linear = [name for name, module in model.named_modules()
              if is_linear(module) and any(name == t or name.startswith(t + ".") for t in targets)]
    chosen = [name for name in linear if _matches(name, targets, layers)]
    if not layers or any(not any(_names_layer(name, layer) for name in chosen) for layer in layers):
        raise AdapterError(_unknown_targets(linear, layers, targets) if layers else "no LoRA targets given")
    for name in chosen:
        _set_child(model, name, LoRALinear(model.get_submodule(name), rank, alpha))
    return chosen


def parse_targets(text: str) -> tuple[str, ...]:
    """'q_proj, v_proj' -> ('q_proj', 'v_proj'): model.lora_targets as a tuple (empty: the defaults)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def default_lora_targets(decoder: nn.Module) -> tuple[str, ...]:
    """The decoder's own LoRA targets: personae's LORA_LAYERS, or a Hugging Face LM family's projections."""
    lm = getattr(decoder, "lm", None)
    if lm is None:
        return LORA_LAYERS
    model_type = str(getattr(getattr(lm, "config", None), "model_type", ""))
    return HF_LORA_TARGETS.get(model_type, HF_ATTENTION_TARGETS)


def lora_targets_of(model: nn.Module) -> tuple[str, ...]:
    """The targets LoRA wraps on `model`: its config's `lora_targets` when set, else the decoder's defaults."""
    cfg_targets = parse_targets(str(getattr(getattr(model, "cfg", None), "lora_targets", "") or ""))
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        raise AdapterError("the model has no decoder to put LoRA adapters on (model.decoder.enabled is false)")
    return cfg_targets or default_lora_targets(decoder)


def add_decoder_lora(model: nn.Module, rank: int, alpha: float, *, seed: int | None = None,
                     targets: Sequence[str] | None = None) -> list[str]:
    """Give the model's decoder LoRA adapters of rank `rank` (B = 0: a no-op at first); the wrapped names.

    The one way the library adds adapters (meta-training, adaptation, loading a run or an adapter
    file). `targets` default to :func:`lora_targets_of` (model.lora_targets, else the decoder's
    own). `seed` seeds the global RNG first so that A's draw is reproducible (adaptation and
    meta-training record it); the adapters are made on the decoder's device.
    """
    layers = tuple(targets) if targets is not None else lora_targets_of(model)
    if seed is not None:
        torch.manual_seed(seed)
    return add_lora(model, targets=("decoder",), rank=rank, alpha=alpha, layers=layers)


def reset_decoder_lora(model: nn.Module, seed: int) -> int:
    """Start every LoRA layer afresh, exactly as add_decoder_lora(..., seed=seed) starts them; how many.

    For a model whose adapters are no-op placeholders (a server adds them to mix adapters per
    row), so that adapting it starts where adapting a LoRA-free copy of the run would.
    """
    torch.manual_seed(seed)
    layers = [module for module in model.modules() if isinstance(module, LoRALinear)]
    for layer in layers:  # model order, as add_lora wraps them: the same draws
        layer.reset_adapter()
    return len(layers)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every LoRA parameter (`...lora_A`, `...lora_B`) by its full name."""
    return {name: p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in LORA_MARKERS}


def lora_settings(model: nn.Module) -> dict[str, float] | None:
    """{"rank", "alpha"} of a model's LoRA layers (None without LoRA); mixed settings are an error."""
    found = {(m.rank, m.alpha) for m in model.modules() if isinstance(m, LoRALinear)}
    if not found:
        return None
    if len(found) > 1:
        raise AdapterError(f"the model mixes LoRA settings {sorted(found)}; one rank and alpha per model")
    rank, alpha = found.pop()
    return {"rank": rank, "alpha": alpha}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into a plain Linear in place (state_dict keys become the LoRA-free ones)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _set_child(model, name, module.merged())
    return model


def save_adapter(path: str | Path, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, object] | None = None) -> Path:
    """Write adapted tensors (by parameter name) to a safetensors file; metadata values become strings."""
    if not tensors:
        raise AdapterError(f"{path}: no tensors to save in the adapter")
    path = Path(path)
    data = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    with atomic_path(path) as staging:  # a reader never sees half a file
        save_file(data, str(staging), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    return path


def load_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter file: (tensors by parameter name, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{path}: not a readable safetensors adapter file ({error})") from error
    return tensors, metadata


def apply_adapter(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors into the model's parameters (and buffers) of the same names, in place."""
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    unknown = [name for name in tensors if name not in state]
    if unknown:
        hint = " (was the model built with add_lora and the adapter's rank?)" if any(
            name.rsplit(".", 1)[-1] in LORA_MARKERS for name in unknown) else ""
        raise AdapterError(f"adapter key {unknown[0]!r} is not a parameter of the model{hint}; "
                           f"{len(unknown)} unknown key(s)")
    for name, value in tensors.items():
        if state[name].shape != value.shape:
            raise AdapterError(f"adapter tensor {name!r} has shape {tuple(value.shape)}, "
                               f"the model's is {tuple(state[name].shape)}")
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value)
