"""Hparams shared by every algorithm, loaded strictly from JSON.

Keys are those of the ROME/MEMIT/EMMET/ENCORE/AlphaEdit reference files, so their JSON files load. An unknown
key, a missing required key or a value of the wrong type raises HparamsError naming the file and key.
Reference keys of features we do not implement (INERT_KEYS) are accepted only at a value that changes
nothing; they are kept in `inert_keys` (logged, and recorded in params.json), any other value is an error.
"""
import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from util.errors import InputError
from util.tokens import FACT_TOKENS


class HparamsError(InputError):
    pass


ANY_VALUE = object()
# Reference-file keys we do not implement: the values at which they change nothing, and why.
INERT_KEYS = {
    "calculate_objective_value": ((False,), "objective-value logging of the reference (not implemented)"),
    "calculate_norms": ((False,), "SVD logging of the reference (matrix norms are in weight_norms.jsonl)"),
    "calculate_norm": ((False,), "SVD logging of the reference (matrix norms are in weight_norms.jsonl)"),
    "use_gd": ((False,), "gradient-descent solve of the reference (not implemented)"),
    "norm_control": ((0,), "the reference's spectral norm control (not implemented)"),
    "random_vector_preservation": ((False,), "random-key preservation of the reference (not implemented)"),
    "grad_desc_lr": (ANY_VALUE, "used only with use_gd"),
    "grad_desc_steps": (ANY_VALUE, "used only with use_gd"),
    "gd_lambda": (ANY_VALUE, "used only with use_gd"),
    "spectral_norm": (ANY_VALUE, "used only with norm_control"),
    "condition_num": (ANY_VALUE, "used only with norm_control"),
    "model_name": (ANY_VALUE, "informational in the AlphaEdit files"),
    "emmet_lambda": (ANY_VALUE, "EMMET's ridge, in the ENCORE files; no effect on a least-squares objective"),
}


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
    mom2_max_length: typing.Optional[int] = None  # texts truncated here; None: the model's maximum positions
    mom2_update_weight: float = 1.0
    update_norm_lambda: float = 0.0
    dynamic: bool = False  # FastMEMIT: cap the sample at dynamic_multiplier x d_k tokens
    dynamic_multiplier: float = 10.0
    layer_selection: str = "all"
    # Lifelong regularisers (SPEC §8), usable by every objective; all off by default.
    add_prev_edits: bool = False  # ENCORE: P_t = λC0 + uI + S_t, S_t = Σ earlier batches' K Kᵀ at the layer
    prob_cutoff: float = 0.0  # MPES: -k: stop when every target token is the argmax k steps in a row; p > 0
    nullspace_threshold: float = 0.0  # AlphaEdit: project updates onto C0's eigenvectors below it; 0 = off
    prune_log_base: float = 0.0  # PRUNE: restrain ΔW's singular values above σ_max(W_0) by log_α; α > 1, 0 = off
    rect_top_fraction: float = 0.0  # RECT: keep this fraction of each update's entries by |ΔW|/|W|; 0 = off
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
        _check_values(self)
        if self.fact_token not in FACT_TOKENS:
            raise HparamsError(f"'fact_token' must be one of {FACT_TOKENS}, got {self.fact_token!r}")
        if self.layer_selection != "all":
            raise HparamsError(f"only layer_selection 'all' is supported, got {self.layer_selection!r}")
        if self.dynamic and self.dynamic_multiplier <= 0:
            raise HparamsError("'dynamic_multiplier' must be positive")
        if self.prune_log_base and not self.prune_log_base > 1:
            raise HparamsError(f"'prune_log_base' is {self.prune_log_base!r}", type(self).__name__,
                               "give 0 (off) or the base α > 1 of PRUNE's logarithm (2.718281828459045: natural log)")
        if not 0 <= self.rect_top_fraction <= 1:
            raise HparamsError(f"'rect_top_fraction' is {self.rect_top_fraction!r}", type(self).__name__,
                               "give 0 (off) or the fraction of each update's entries RECT keeps, in (0, 1]")
        if self.mom2_max_length is not None and self.mom2_max_length < 1:
            raise HparamsError(f"'mom2_max_length' is {self.mom2_max_length!r}", type(self).__name__,
                               "give a positive number of tokens, or null (the model's maximum positions)")
        if self.prob_cutoff < 0 and self.prob_cutoff != int(self.prob_cutoff) or self.prob_cutoff >= 1:
            raise HparamsError(f"'prob_cutoff' is {self.prob_cutoff!r}", type(self).__name__,
                               "give 0 (off), a negative integer -k (stop once the targets were the argmax k steps "
                               "in a row) or a probability in (0, 1)")

    @classmethod
    def from_json(cls, path, defaults: dict | None = None):
        """The hparams of a JSON file; `defaults` fill keys the file does not set (a registry variant's switches)."""
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
        return cls.from_dict({**(defaults or {}), **data}, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>"):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        inert = {}
        for key in sorted(set(data) & set(INERT_KEYS) - set(fields)):
            allowed, why = INERT_KEYS[key]
            if allowed is not ANY_VALUE and (isinstance(data[key], bool) != isinstance(allowed[0], bool)
                                             or data[key] not in allowed):
                raise HparamsError(f"{source}: key {key!r} = {data[key]!r} is not supported ({why}); "
                                   f"set it to {allowed[0]!r} or remove it")
            inert[key] = data[key]
        data = {key: value for key, value in data.items() if key not in inert}
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
            hparams = cls(**data)
        except HparamsError as e:  # located in the file the values came from
            raise (HparamsError(e.what, source, e.fix) if e.where else HparamsError(f"{source}: {e}")) from None
        hparams.inert_keys = inert
        return hparams

    inert_keys = {}  # reference keys accepted at a value that changes nothing (see INERT_KEYS)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), **({"inert_keys": dict(self.inert_keys)} if self.inert_keys else {})}

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
        raise HparamsError(f"key {name!r} is {value!r}", source, f"give a {names}")


# Value ranges: outside them an edit fails deep inside (a traceback) or silently does nothing.
POSITIVE_KEYS = {
    "v_num_grad_steps": "the target optimisation's Adam steps; 0 would edit towards the unoptimised value",
    "v_lr": "the target optimisation's learning rate",
    "clamp_norm_factor": "the bound on the target's change, relative to its norm",
    "mom2_update_weight": "the preservation weight λ of P = λ·C0 + u·I",
    "mom2_n_samples": "articles for C0",
}
NON_NEGATIVE_KEYS = ("v_weight_decay", "kl_factor", "update_norm_lambda", "emmet_lambda", "v_loss_layer",
                     "nullspace_threshold", "L2")


def _check_values(hp) -> None:
    """Every number finite and in range, the template lengths well formed; HparamsError (what, where, fix)."""
    where = type(hp).__name__
    for field in dataclasses.fields(hp):
        value = getattr(hp, field.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
            raise HparamsError(f"{field.name!r} is {value!r}", where, "give a finite number")
    if min(hp.layers) < 0:
        raise HparamsError(f"'layers' {hp.layers} has a negative layer", where, "give layer numbers from 0")
    for name, meaning in POSITIVE_KEYS.items():
        if getattr(hp, name) <= 0:
            raise HparamsError(f"{name!r} is {getattr(hp, name)!r}", where, f"give a number above 0 ({meaning})")
    for name in NON_NEGATIVE_KEYS:
        if getattr(hp, name, 0) < 0:
            raise HparamsError(f"{name!r} is {getattr(hp, name)!r}", where, "give a number of at least 0")
    _check_template_lengths(hp.context_template_length_params, where)
    from algs.second_moment import FORWARD_DTYPES

    if hp.mom2_dtype not in FORWARD_DTYPES:
        raise HparamsError(f"'mom2_dtype' is {hp.mom2_dtype!r}", where, f"give one of {sorted(FORWARD_DTYPES)}")
    if not hp.mom2_dataset.strip():
        raise HparamsError("'mom2_dataset' is empty", where, "give 'wikipedia', 'wikitext-103' or a local text path")


def _check_template_lengths(length_params, where: str) -> None:
    """context_template_length_params: [[n_tokens, n_templates], ...], both positive integers."""
    for pair in length_params:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in pair)):
            raise HparamsError(f"'context_template_length_params' has the entry {pair!r}", where,
                               "give [[n_tokens, n_templates], ...] with positive integers, e.g. [[10, 5]]")
