"""Hparams shared by every algorithm, loaded strictly from JSON.

Keys are those of the ROME/MEMIT/EMMET reference files, so their JSON files load unchanged. An unknown
key, a missing required key or a value of the wrong type raises HparamsError naming the file and key.
"""
import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path

from util.tokens import FACT_TOKENS


class HparamsError(ValueError):
    pass


@dataclass
class EditHparams:
    # Edit distribution: one layer, or a MEMIT spread over several (target written at the last).
    layers: list
    # Target-value optimisation (SPEC §3).
    v_num_grad_steps: int
    v_lr: float
    v_loss_layer: int
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    fact_token: str = "subject_last"
    # Context templates: [[n_tokens, n_templates], ...].
    context_template_length_params: list = dataclasses.field(default_factory=lambda: [[10, 5]])
    # Second-moment statistics (SPEC §4).
    mom2_adjustment: bool = True
    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float32"
    mom2_update_weight: float = 1.0
    update_norm_lambda: float = 0.0
    dynamic: bool = False  # FastMEMIT: cap the sample at dynamic_multiplier x d_k tokens
    dynamic_multiplier: float = 10.0
    layer_selection: str = "all"
    # Module names; None = take them from util/arch.py's table.
    rewrite_module_tmp: typing.Optional[str] = None
    layer_module_tmp: typing.Optional[str] = None
    mlp_module_tmp: typing.Optional[str] = None
    attn_module_tmp: typing.Optional[str] = None
    ln_f_module: typing.Optional[str] = None
    lm_head_module: typing.Optional[str] = None

    def __post_init__(self):
        if not self.layers or not all(isinstance(x, int) for x in self.layers):
            raise HparamsError(f"'layers' must be a non-empty list of ints, got {self.layers!r}")
        if sorted(set(self.layers)) != list(self.layers):
            raise HparamsError(f"'layers' must be strictly increasing, got {self.layers!r}")
        if self.fact_token not in FACT_TOKENS:
            raise HparamsError(f"'fact_token' must be one of {FACT_TOKENS}, got {self.fact_token!r}")
        if self.layer_selection != "all":
            raise HparamsError(f"only layer_selection 'all' is supported, got {self.layer_selection!r}")
        if self.dynamic and self.dynamic_multiplier <= 0:
            raise HparamsError("'dynamic_multiplier' must be positive")

    @classmethod
    def from_json(cls, path):
        path = Path(path)
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise HparamsError(f"hparams file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise HparamsError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise HparamsError(f"{path} must hold a JSON object")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>"):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise HparamsError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(fields)}")
        required = [n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise HparamsError(f"{source}: missing required key(s) {missing} for {cls.__name__}")
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            _check_type(source, name, value, hints[name])
        try:
            return cls(**data)
        except HparamsError as e:
            raise HparamsError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def module_overrides(self) -> dict:
        return {k: getattr(self, k) for k in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp",
                                              "attn_module_tmp", "ln_f_module", "lm_head_module")}


def _check_type(source, name, value, hint):
    allowed = typing.get_args(hint) or (hint,)
    ok = False
    for t in allowed:
        if t is type(None):
            ok |= value is None
        elif t is float:
            ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
        elif t is int:
            ok |= isinstance(value, int) and not isinstance(value, bool)
        else:
            ok |= isinstance(value, typing.get_origin(t) or t)
    if not ok:
        names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
        raise HparamsError(f"{source}: key {name!r} must be {names}, got {value!r}")
