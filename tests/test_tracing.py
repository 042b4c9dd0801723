"""Forward hooks of util.tracing against plain PyTorch hooks and hand-computed outputs."""
import pytest
import torch
from torch import nn

from tests.conftest import make_tiny_model
from util.tracing import StopForward, add_at_positions, frozen, hidden_of, logits_at, run_until, trace_modules


class TupleBlock(nn.Module):
    """A decoder block as in transformers 4.x: returns (hidden, extra)."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x), "extra"


class TensorBlock(nn.Module):
    """A decoder block as in transformers 5.x: returns the hidden tensor."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x)


class Toy(nn.Module):
    def __init__(self, block_type, d=6):
        super().__init__()
        torch.manual_seed(0)
        self.block = block_type(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(torch.tanh(hidden_of(self.block(x))))


def toy_input():
    return torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1))


def test_hidden_of():
    hidden = torch.ones(2)
    assert hidden_of(hidden) is hidden
    assert hidden_of((hidden, "extra")) is hidden
    assert hidden_of([hidden, None]) is hidden


def test_trace_matches_a_plain_forward_hook(embedded_tokenizer):
    model = make_tiny_model("gpt2", embedded_tokenizer, n_layer=2)
    name = "transformer.h.1.mlp.c_proj"
    seen = {}
    handle = model.get_submodule(name).register_forward_hook(
        lambda module, args, output: seen.update(input=args[0].clone(), output=output.clone()))
    input_ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad(), trace_modules(model, [name, "transformer.h.0"], retain_input=True) as traces:
        model(input_ids=input_ids)
    handle.remove()
    assert torch.equal(traces[name].input, seen["input"])
    assert torch.equal(traces[name].output, seen["output"])
    assert traces["transformer.h.0"].output.shape == (1, 5, 32)  # decoder block: the hidden state, not a tuple
    with torch.no_grad(), trace_modules(model, [name], retain_output=False) as traces:
        model(input_ids=input_ids)
    assert traces[name].input is None and traces[name].output is None  # nothing kept unless asked


@pytest.mark.parametrize("block_type", [TupleBlock, TensorBlock])
def test_edit_output_adds_vectors_at_positions(block_type):
    model = Toy(block_type)
    x = toy_input()
    rows, positions = [0, 1, 1], [2, 0, 3]
    vectors = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    edit = {"block": lambda hidden: add_at_positions(hidden, rows, positions, vectors)}
    with torch.no_grad(), trace_modules(model, ["block"], edit_output=edit) as traces:
        edited = model(x)
    with torch.no_grad():
        hidden = model.block.proj(x)
        manual = hidden.clone()
        for row, position, vector in zip(rows, positions, vectors):
            manual[row, position] += vector
        expected = model.head(torch.tanh(manual))
    assert torch.allclose(edited, expected, atol=1e-6)
    assert torch.allclose(traces["block"].output, manual, atol=1e-6)  # the trace holds the edited output
    untouched = torch.ones(2, 4, dtype=torch.bool)
    untouched[rows, positions] = False
    assert torch.equal(traces["block"].output[untouched], hidden[untouched])


def test_edit_output_keeps_the_tuple_structure():
    model = Toy(TupleBlock)
    outputs = []
    with torch.no_grad(), trace_modules(model, ["block"], edit_output={"block": lambda h: h + 1}):
        # Registered after the traced hook, so it sees what that hook returned.
        model.block.register_forward_hook(lambda module, args, output: outputs.append(output))
        model(toy_input())
    assert isinstance(outputs[0], tuple) and outputs[0][1] == "extra"
    assert torch.allclose(outputs[0][0], model.block.proj(toy_input()) + 1)


def test_add_at_positions_accumulates_repeated_positions_and_keeps_gradients():
    hidden = torch.zeros(1, 3, 2)
    vectors = torch.tensor([[1.0, 2.0], [10.0, 20.0]], requires_grad=True)
    out = add_at_positions(hidden, [0, 0], [1, 1], vectors)
    assert torch.equal(out[0, 1], torch.tensor([11.0, 22.0]))
    assert torch.equal(out[0, [0, 2]], torch.zeros(2, 2))
    out.sum().backward()
    assert torch.equal(vectors.grad, torch.ones(2, 2))


def test_stop_after_ends_the_forward_pass(embedded_tokenizer):
    model = make_tiny_model("llama", embedded_tokenizer, n_layer=3)
    later_calls = []
    handles = [model.get_submodule(name).register_forward_hook(lambda *args: later_calls.append(1))
               for name in ("model.layers.1.mlp.up_proj", "model.layers.2", "model.norm", "lm_head")]
    input_ids = torch.tensor([[5, 17, 300]])
    stop = "model.layers.1.mlp.gate_proj"
    with torch.no_grad(), trace_modules(model, ["model.layers.0"], retain_input=True, stop_after=stop) as traces:
        run_until(model, input_ids=input_ids)
        with pytest.raises(StopForward):
            model(input_ids=input_ids)
    assert later_calls == []
    assert traces["model.layers.0"].output is not None
    assert traces[stop].input.shape == (1, 3, 32)  # the stop module is traced too
    with torch.no_grad():  # hooks are removed on exit: the full pass runs again
        model(input_ids=input_ids)
    assert len(later_calls) == 4
    for handle in handles:
        handle.remove()


def test_hooks_are_removed_after_an_error():
    model = Toy(TensorBlock)
    with pytest.raises(RuntimeError, match="boom"):
        with trace_modules(model, ["block", "head"]):
            raise RuntimeError("boom")
    assert not model.block._forward_hooks and not model.head._forward_hooks


def test_detach_false_keeps_the_graph():
    model = Toy(TensorBlock)
    with trace_modules(model, ["block"], detach=False) as traces:
        model(toy_input())
    assert traces["block"].output.requires_grad
    with trace_modules(model, ["block"]) as traces:
        model(toy_input())
    assert not traces["block"].output.requires_grad


def test_frozen_restores_requires_grad():
    model = Toy(TupleBlock)
    model.head.bias.requires_grad_(False)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    assert set(before.values()) == {True, False}
    with frozen(model):
        assert not any(p.requires_grad for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    with pytest.raises(RuntimeError, match="boom"):
        with frozen(model):
            raise RuntimeError("boom")
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before


def test_logits_at_gives_the_full_logits_at_each_rows_positions(embedded_tokenizer):
    """Row i's logits at positions[i] only, equal to the same entries of the full forward, for any k."""
    model = make_tiny_model("llama", embedded_tokenizer, n_layer=2)
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    full = model(input_ids=ids).logits
    positions = torch.tensor([[6, 2], [0, 0], [3, 5]])
    with logits_at(model, positions):
        kept = model(input_ids=ids).logits
    assert kept.shape == (3, 2, full.shape[-1])
    for row in range(3):
        for column, position in enumerate(positions[row].tolist()):
            assert torch.allclose(kept[row, column], full[row, position], atol=1e-5, rtol=1e-5)
    assert model(input_ids=ids).logits.shape == full.shape  # the hook is gone after the block
