"""Forward hooks: read a module's input/output, add vectors to its output, stop the forward pass.

Decoder blocks return a tuple in transformers 4.x and a tensor in 5.x; `hidden_of` hides that.
"""
import inspect
from contextlib import contextmanager

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the module we need has run."""


def hidden_of(output):
    """The hidden-state tensor of a module output (first element if it is a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_hidden(output, hidden):
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


class Trace:
    """Records of one module during a forward pass: `.input` (first positional arg), `.output` (hidden)."""

    def __init__(self):
        self.input = None
        self.output = None


@contextmanager
def trace_modules(model: nn.Module, names, retain_input=False, retain_output=True, stop_after=None,
                  edit_output=None, detach=True):
    """Hook modules by name. Yields {name: Trace}.

    stop_after: a module name; the forward pass raises StopForward right after it (use `run_until`).
    edit_output: {name: fn(hidden) -> hidden}, applied to the module's output hidden state.
    """
    names = list(dict.fromkeys(list(names) + ([stop_after] if stop_after else [])))
    edit_output = edit_output or {}
    traces = {name: Trace() for name in names}
    handles = []

    def make_hook(name):
        def hook(module, args, output):
            trace = traces[name]
            if retain_input:
                trace.input = args[0].detach() if detach else args[0]
            if name in edit_output:
                output = _replace_hidden(output, edit_output[name](hidden_of(output)))
            if retain_output:
                hidden = hidden_of(output)
                trace.output = hidden.detach() if detach else hidden
            if name == stop_after:
                raise StopForward()
            return output

        return hook

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
        yield traces
    finally:
        for handle in handles:
            handle.remove()


def run_until(model: nn.Module, **inputs) -> None:
    """Run a forward pass that a `stop_after` hook may cut short."""
    try:
        model(**inputs)
    except StopForward:
        pass


def add_at_positions(hidden: torch.Tensor, rows, positions, vectors: torch.Tensor) -> torch.Tensor:
    """hidden[rows[i], positions[i]] += vectors[i], out of place so autograd sees it."""
    rows = torch.as_tensor(rows, device=hidden.device)
    positions = torch.as_tensor(positions, device=hidden.device)
    addition = torch.zeros_like(hidden)
    addition = addition.index_put((rows, positions), vectors.to(device=hidden.device, dtype=hidden.dtype), accumulate=True)
    return hidden + addition


@contextmanager
def logits_at(model: nn.Module, positions: torch.Tensor):
    """Inside the block the model's logits are (rows, k, vocab): row i only at its positions[i] (a (rows, k)
    tensor of sequence positions), by gathering the hidden states the output embedding receives. The
    vocabulary projection is a large share of a small model's forward, and most positions are never read."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding module to restrict")

    def gather(module, args):
        hidden = args[0]
        index = positions.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])
        return (hidden.gather(1, index), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def frozen(model: nn.Module):
    """Parameters do not require grad inside the block (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def accepts_forward_argument(model: nn.Module, name: str) -> bool:
    """Whether model.forward takes the keyword `name` (it differs between transformers versions and models)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword of the key/value cache: `cache` in newer transformers (`past_key_values` is
    deprecated there), `past_key_values` before."""
    return "cache" if accepts_forward_argument(model, "cache") else "past_key_values"


def output_cache(outputs):
    """The key/value cache a forward pass returned (under either name)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)
