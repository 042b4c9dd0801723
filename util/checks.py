"""Checks of edit requests and of hparams against a model, shared by the dataset loaders, the CLI and the
Python API, so that a problem gets the same one-line InputError wherever it is found.

A request is one fact to write: {"prompt": "... {} ...", "subject": str, "target_new": {"str": str},
optionally "target_true": {"str": str}}. A bad one would not fail loudly later: an empty subject edits the
last (padded) position, an equal target edits nothing, stray braces break str.format deep in the edit.
"""
import torch

from util.arch import get_module, module_names, num_layers
from util.errors import InputError

REQUEST_KEYS = ("prompt", "subject", "target_new")


def check_prompt_template(template, where: str) -> None:
    """Exactly one "{}" (the subject) and no other braces, so template.format(subject) is the prompt."""
    if not isinstance(template, str):
        raise InputError(f"prompt {template!r} is not a string", where, "give a template such as '{} is located in'")
    count = template.count("{}")
    if count != 1:
        raise InputError(f"prompt {template!r} has {count} '{{}}'", where,
                         "put exactly one '{}' where the subject goes")
    rest = template.replace("{}", "", 1)
    if "{" in rest or "}" in rest:
        raise InputError(f"prompt {template!r} has braces besides its '{{}}'", where,
                         "remove them (only the subject's '{}' may have braces)")


def target_text(request: dict, key: str, where: str) -> str:
    """request[key]["str"], checked to be a non-empty string."""
    target = request.get(key)
    text = target.get("str") if isinstance(target, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{key} is {target!r}", where, f"give {key} as {{'str': 'the answer'}} with a non-empty answer")
    return text


def check_request(request, where: str) -> None:
    """One fact to write: a template, a non-empty subject, non-empty targets, target_new != target_true."""
    if not isinstance(request, dict):
        raise InputError(f"request is a {type(request).__name__}", where,
                         f"give a dict with the keys {', '.join(REQUEST_KEYS)}")
    missing = [key for key in REQUEST_KEYS if key not in request]
    if missing:
        raise InputError(f"request lacks {missing}", where, f"give every one of {', '.join(REQUEST_KEYS)}")
    check_prompt_template(request["prompt"], where)
    subject = request["subject"]
    if not isinstance(subject, str) or not subject.strip():
        raise InputError(f"subject is {subject!r}", where, "give the non-empty subject that fills the prompt's '{}'")
    new = target_text(request, "target_new", where)
    if "target_true" in request and target_text(request, "target_true", where).strip() == new.strip():
        raise InputError(f"target_new equals target_true ({new.strip()!r})", where,
                         "give a new target that differs from the true one (this edit would change nothing)")


def request_where(where: str, index: int, request) -> str:
    """`where` narrowed to one request: its position and, when it has one, its case_id."""
    case_id = request.get("case_id") if isinstance(request, dict) else None
    return f"{where} request {index}" + (f" (case_id {case_id})" if case_id is not None else "")


def check_requests(requests, where: str) -> None:
    """A non-empty list of requests, each checked (a lone dict is a common slip: it must be wrapped in a list)."""
    if not isinstance(requests, (list, tuple)):
        raise InputError(f"requests is a {type(requests).__name__}", where,
                         "pass a list of request dicts (e.g. [request] for one fact)")
    if not requests:
        raise InputError("requests is empty", where, "pass at least one request dict")
    for index, request in enumerate(requests):
        check_request(request, request_where(where, index, request))


def check_hparams_fit(model, hp, where: str) -> None:
    """The edited layers exist in `model`, v_loss_layer is its last layer and the module names resolve."""
    n_layers = num_layers(model)
    if max(hp.layers) >= n_layers or hp.v_loss_layer != n_layers - 1:
        raise InputError(f"layers {hp.layers} / v_loss_layer {hp.v_loss_layer} do not fit a model with {n_layers} "
                         f"layers", where, f"use layers below {n_layers} and v_loss_layer {n_layers - 1} (are these "
                                           f"hparams for another model?)")
    try:
        names = module_names(model, hp.module_overrides())
        edited = {layer: get_module(model, names.rewrite_module_tmp.format(layer)) for layer in hp.layers}
    except ValueError as error:  # an architecture without a table entry, or module names of another model
        raise InputError(f"module names do not resolve ({error})", where,
                         "set rewrite_module_tmp and the other *_module_tmp keys to this model's module names") \
            from None
    offloaded = [layer for layer, module in edited.items() if module.weight.device.type == "meta"]
    if offloaded:  # Accelerate's disk/meta offload: the weights are not in memory to be edited
        raise InputError(f"the edited layers {offloaded} are offloaded (meta device)", where,
                         "place the edited layers on a GPU or the CPU in --device_map (other layers may be offloaded)")


def check_edit_inputs(model, requests, hp, where: str) -> None:
    """Everything an apply_<alg>_to_model call can check before it computes anything."""
    check_requests(requests, where)
    check_hparams_fit(model, hp, where)


def check_device(device: str) -> None:
    """--device names a device torch can use on this machine (else the model load fails with a traceback)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"{device!r} is not a torch device", "--device", "give cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"CUDA is not available on this machine (torch {torch.__version__})", f"--device {device}",
                         "use --device cpu, or leave --device out (cuda when available, else cpu)")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise InputError(f"there are {torch.cuda.device_count()} CUDA devices", f"--device {device}",
                         f"give cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("MPS is not available on this machine", f"--device {device}", "use --device cpu")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device type {parsed.type!r} is not supported", f"--device {device}",
                         "give cpu, cuda, cuda:N or mps")
