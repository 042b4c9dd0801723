"""Registry: algorithm name -> its package (hparams class, objective, apply function), and the Editor.

Packages are imported lazily so that `import algs.pm_solver` does not load every algorithm. A variant entry
(MEMIT-PRUNE, ...) is its base algorithm with regulariser switches on by default; it reads the base's hparams
files (hparams/MEMIT/...), and a key the file sets wins over the switch.
"""
import importlib
import math
from dataclasses import dataclass, field

# name -> (package, hparams class, apply function)
PACKAGES = {
    "ROME": ("algs.rome", "ROMEHyperParams", "apply_rome_to_model"),
    "MEMIT": ("algs.memit", "MEMITHyperParams", "apply_memit_to_model"),
    "EMMET": ("algs.emmet", "EMMETHyperParams", "apply_emmet_to_model"),
    "ENCORE": ("algs.encore", "ENCOREHyperParams", "apply_encore_to_model"),
    "AlphaEdit": ("algs.alphaedit", "AlphaEditHyperParams", "apply_alphaedit_to_model"),
}
# Combinations the regulariser papers evaluate (SPEC §8): name -> (base algorithm, hparams switched on).
RECT_TOP_FRACTION = 0.2  # RECT keeps the top 20 % of each update's entries (our reading of its experiments)
VARIANTS = {
    "ROME-PRUNE": ("ROME", {"prune_log_base": math.e}),
    "MEMIT-PRUNE": ("MEMIT", {"prune_log_base": math.e}),
    "ROME-RECT": ("ROME", {"rect_top_fraction": RECT_TOP_FRACTION}),
    "MEMIT-RECT": ("MEMIT", {"rect_top_fraction": RECT_TOP_FRACTION}),
}
ALGORITHMS = sorted([*PACKAGES, *VARIANTS])


@dataclass(frozen=True)
class Algorithm:
    name: str
    hparams_class: type
    objective: object  # (hparams, batch_size) -> distribute.Objective
    apply: object  # the reference-style apply_<alg>_to_model(model, tok, requests, hparams, ...)
    one_at_a_time: bool  # ROME: each fact its own rank-one edit
    hparams_dir: str  # hparams/<hparams_dir>/ holds its files
    switches: dict = field(default_factory=dict)  # hparams a variant turns on unless its file sets them

    def load_hparams(self, source, where: str | None = None):
        """hparams from a JSON file path, a dict, or an hparams object (returned as it is)."""
        if isinstance(source, self.hparams_class):
            return source
        if isinstance(source, dict):
            return self.hparams_class.from_dict({**self.switches, **source}, source=where or "<dict>")
        return self.hparams_class.from_json(source, defaults=self.switches)


def algorithm(name: str) -> Algorithm:
    """The registry entry of "ROME", "MEMIT", "EMMET", "ENCORE", "AlphaEdit" or a variant such as "MEMIT-PRUNE"."""
    from util.errors import InputError

    if name not in ALGORITHMS:
        raise InputError(f"unknown algorithm {name!r}", "the algorithm name", f"choose one of {', '.join(ALGORITHMS)}")
    base, switches = VARIANTS.get(name, (name, {}))
    module_name, hparams_class, apply_function = PACKAGES[base]
    module = importlib.import_module(module_name)
    return Algorithm(name, getattr(module, hparams_class), module.objective, getattr(module, apply_function),
                     getattr(module, "ONE_AT_A_TIME", False), base, dict(switches))


def get_algorithm(name: str):
    """(hparams class, apply function) of a base algorithm, as the reference repos' registries give them
    (a variant's switches live in its registry entry: use `algorithm(name).load_hparams`)."""
    if name in VARIANTS:
        raise ValueError(f"{name} is a variant of {VARIANTS[name][0]}: use algs.algorithm({name!r}).load_hparams(...) "
                         f"and the Editor")
    entry = algorithm(name)
    return entry.hparams_class, entry.apply


def __getattr__(name):  # `from algs import Editor` without importing torch-heavy modules for the registry
    if name in ("Editor", "EditState"):
        module = importlib.import_module("algs.editor" if name == "Editor" else "algs.state")
        return getattr(module, name)
    raise AttributeError(f"module 'algs' has no attribute {name!r}")
