"""Registry: algorithm name -> (hparams class, apply function).

Imported lazily so that `import algs.pm_solver` does not load every algorithm.
"""
import importlib

ALGORITHMS = {
    "ROME": ("algs.rome", "ROMEHyperParams", "apply_rome_to_model"),
    "MEMIT": ("algs.memit", "MEMITHyperParams", "apply_memit_to_model"),
    "EMMET": ("algs.emmet", "EMMETHyperParams", "apply_emmet_to_model"),
    "ENCORE": ("algs.encore", "ENCOREHyperParams", "apply_encore_to_model"),
    "AlphaEdit": ("algs.alphaedit", "AlphaEditHyperParams", "apply_alphaedit_to_model"),
}


def get_algorithm(name: str):
    """(hparams class, apply function) for "ROME", "MEMIT", "EMMET", "ENCORE" or "AlphaEdit"."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    module_name, hparams_class, apply_function = ALGORITHMS[name]
    module = importlib.import_module(module_name)
    return getattr(module, hparams_class), getattr(module, apply_function)
