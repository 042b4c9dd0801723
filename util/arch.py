"""The one table of model architectures: which modules an editor reads and writes.

Keyed by `model.config.model_type`. Module names use "{}" for the layer number. An hparams file may
name modules explicitly (rewrite_module_tmp, layer_module_tmp, ...); those names win over this table.
"""
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class ModuleNames:
    rewrite_module_tmp: str  # the edited matrix W: the MLP's output (down) projection
    layer_module_tmp: str  # a decoder block; its output is the residual stream
    mlp_module_tmp: str
    attn_module_tmp: str
    ln_f_module: str
    lm_head_module: str
    layers_module: str  # the ModuleList of blocks


ARCHITECTURES = {
    "gpt2": ModuleNames(
        "transformer.h.{}.mlp.c_proj", "transformer.h.{}", "transformer.h.{}.mlp",
        "transformer.h.{}.attn", "transformer.ln_f", "transformer.wte", "transformer.h",
    ),
    "gptj": ModuleNames(
        "transformer.h.{}.mlp.fc_out", "transformer.h.{}", "transformer.h.{}.mlp",
        "transformer.h.{}.attn", "transformer.ln_f", "lm_head", "transformer.h",
    ),
    "gpt_neox": ModuleNames(
        "gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp",
        "gpt_neox.layers.{}.attention", "gpt_neox.final_layer_norm", "embed_out", "gpt_neox.layers",
    ),
}
_LLAMA_LIKE = ModuleNames(
    "model.layers.{}.mlp.down_proj", "model.layers.{}", "model.layers.{}.mlp",
    "model.layers.{}.self_attn", "model.norm", "lm_head", "model.layers",
)
for _model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
    ARCHITECTURES[_model_type] = _LLAMA_LIKE

MODULE_KEYS = tuple(ModuleNames.__dataclass_fields__)


def module_names(model, overrides: dict | None = None) -> ModuleNames:
    """The module names for `model`; non-None entries of `overrides` (from hparams) win."""
    model_type = model.config.model_type
    base = ARCHITECTURES.get(model_type)
    overrides = {k: v for k, v in (overrides or {}).items() if k in MODULE_KEYS and v is not None}
    if base is None:
        missing = [k for k in MODULE_KEYS if k != "layers_module" and k not in overrides]
        if missing:
            raise ValueError(
                f"model_type {model_type!r} is not in the architecture table "
                f"({', '.join(sorted(ARCHITECTURES))}); name its modules in the hparams file: {missing}"
            )
        base = ModuleNames(**{k: overrides.get(k, "") for k in MODULE_KEYS})
    return ModuleNames(**{**base.__dict__, **overrides})


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no module named {name!r}") from None


def num_layers(model) -> int:
    config = model.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, attr):
            return getattr(config, attr)
    raise ValueError(f"cannot read the number of layers from {type(config).__name__}")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores W as (d_in, d_out), the transpose of nn.Linear's (d_out, d_in)."""
    if isinstance(module, Conv1D):
        return True
    if isinstance(module, nn.Linear):
        return False
    raise TypeError(f"edited module must be nn.Linear or transformers Conv1D, got {type(module).__name__}")


def weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """W in the (d_out, d_in) orientation of the formulas, as a view of the stored parameter."""
    return module.weight.T if is_conv1d(module) else module.weight


def add_update(module: nn.Module, delta_out_in: torch.Tensor) -> None:
    """Add Δ, given as (d_out, d_in), to the stored weight in its own orientation and dtype."""
    weight = module.weight
    delta = delta_out_in.T if is_conv1d(module) else delta_out_in
    if delta.shape != weight.shape:
        raise ValueError(f"update of shape {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
    with torch.no_grad():
        weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
