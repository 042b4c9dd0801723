"""C0 statistics: exact FastMEMIT token cap, pads not counted, early stop, disk cache integrity, corpora."""
import json
import logging
import random
import shutil
import sys
import types

import pytest
import torch
from safetensors import safe_open

from algs.second_moment import layer_second_moment

from algs.stats_corpus import sample_token_ids, split_articles

from algs.stats_cache import write_cache
from tests.conftest import make_tiny_model, shared_path

D_MLP = 64
MAX_POSITIONS = 128  # tiny models' n_positions / max_position_embeddings
EDITED = {"gpt2": "transformer.h.{}.mlp.c_proj", "llama": "model.layers.{}.mlp.down_proj"}
LATER = {"gpt2": ["transformer.h.2.mlp.c_fc", "transformer.h.3", "transformer.ln_f"],
         "llama": ["model.layers.2.mlp.up_proj", "model.layers.3", "model.norm"]}
WORDS = "the of river city was built in north old king music film played great war ship line".split()


def wikitext_corpus(n_articles=8, seed=0):
    """WikiText-style text: ' = Title = ' article markers, ' = = Section = = ' inside, varied lengths."""
    rng = random.Random(seed)
    parts = []
    for i in range(n_articles):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 160)))
        parts.append(f" = Article {i} = \n \n {body} \n \n = = Section = = \n \n {body[:80]} \n \n")
    return "".join(parts)


def tiny(arch, tok):
    return make_tiny_model(arch, tok, d_mlp=D_MLP).double()


def second_moment(model, tok, layer_module, stats_dir, corpus, **overrides):
    args = dict(corpus=str(corpus), dynamic=True, dynamic_multiplier=3, n_samples=0, model_id="tiny/model",
                model_revision="r0", stats_dir=stats_dir, dtype="float64", seed=0)
    return layer_second_moment(model, tok, layer_module, **{**args, **overrides})


def independent_mean_kkT(model, module_name, texts):
    """Mean k kᵀ from full, unpadded, one-text forward passes with a plain pre-hook on the module."""
    keys = []
    handle = model.get_submodule(module_name).register_forward_pre_hook(lambda m, args: keys.append(args[0][0]))
    with torch.no_grad():
        for ids in texts:
            model(input_ids=torch.tensor([ids]))
    handle.remove()
    stacked = torch.cat(keys).double()
    return stacked.T @ stacked / stacked.shape[0]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(1), with_kwargs=True)
    return calls


def test_split_articles_wikitext_titles_and_plain_paragraphs():
    text = " \n = First = \n \n a b \n = = Sec = = \n c \n \n = Second = \n d \n"
    assert split_articles(text) == ["= First = \n \n a b \n = = Sec = = \n c", "= Second = \n d"]
    assert split_articles("one two\nthree\n\n  \n\nfour\n\n") == ["one two\nthree", "four"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cap_counts_exactly_multiplier_times_dk_and_matches_independent(arch, embedded_tokenizer, corpus_file,
                                                                      tmp_path):
    tok = embedded_tokenizer
    model = tiny(arch, tok)
    layer_module = EDITED[arch].format(1)
    result = second_moment(model, tok, layer_module, tmp_path / "stats", corpus_file)
    assert result.n_tokens == 3 * D_MLP == 192
    assert result.matrix.shape == (D_MLP, D_MLP) and result.matrix.dtype == torch.float64
    assert result.cache == "miss" and result.cache_path.is_file()

    articles = split_articles(corpus_file.read_text())
    texts = sample_token_ids(tok, articles, seed=0, max_length=MAX_POSITIONS, n_tokens=192)
    full = [tok(a, truncation=True, max_length=MAX_POSITIONS)["input_ids"] for a in articles]
    assert sum(map(len, texts)) == 192 and len(texts) == result.n_texts
    origins = [full.index(ids) if ids in full else None for ids in texts[:-1]]
    assert None not in origins and len(set(origins)) == len(origins)  # whole, distinct articles
    assert any(f[: len(texts[-1])] == texts[-1] and i not in origins for i, f in enumerate(full))  # cut last
    assert rel_err(result.matrix, independent_mean_kkT(model, layer_module, texts)) < 1e-10


def test_pads_not_counted_batched_equals_one_text_at_a_time(embedded_tokenizer, corpus_file, tmp_path):
    tok = embedded_tokenizer
    model = tiny("llama", tok)
    layer_module = EDITED["llama"].format(1)
    padded = second_moment(model, tok, layer_module, tmp_path / "a", corpus_file, batch_tokens=4096)
    single = second_moment(model, tok, layer_module, tmp_path / "b", corpus_file, batch_tokens=1)
    assert padded.n_tokens == single.n_tokens == 192
    assert rel_err(padded.matrix, single.matrix) < 1e-10


def test_cache_hit_truncated_file_and_foreign_key(embedded_tokenizer, corpus_file, tmp_path, caplog):
    tok = embedded_tokenizer
    model = tiny("gpt2", tok)
    layer_module = EDITED["gpt2"].format(1)
    calls = count_forwards(model)
    stats = tmp_path / "stats"
    first = second_moment(model, tok, layer_module, stats, corpus_file)
    n_calls = len(calls)
    assert first.cache == "miss" and n_calls > 0

    hit = second_moment(model, tok, layer_module, stats, corpus_file)
    assert hit.cache == "hit" and len(calls) == n_calls
    assert torch.equal(hit.matrix, first.matrix) and hit.n_tokens == 192 and hit.corpus == first.corpus

    data = first.cache_path.read_bytes()
    first.cache_path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="algs.second_moment"):
        again = second_moment(model, tok, layer_module, stats, corpus_file)
    assert again.cache.startswith("recomputed: unreadable file") and len(calls) > n_calls
    assert any(r.levelno == logging.WARNING and str(first.cache_path) in r.getMessage() for r in caplog.records)
    assert torch.equal(again.matrix, first.matrix)
    assert second_moment(model, tok, layer_module, stats, corpus_file).cache == "hit"  # overwritten whole

    other_seed = second_moment(model, tok, layer_module, stats, corpus_file, seed=1)
    assert other_seed.cache_path != first.cache_path
    assert not torch.allclose(other_seed.matrix, first.matrix)
    shutil.copyfile(other_seed.cache_path, first.cache_path)
    fixed = second_moment(model, tok, layer_module, stats, corpus_file)
    assert fixed.cache == "recomputed: stored key differs in ['seed']"
    assert torch.equal(fixed.matrix, first.matrix)


@pytest.mark.parametrize("problem, make_bad", [
    ("not symmetric", lambda m: m + torch.triu(torch.ones_like(m), 1)),
    ("expected float64 (64, 64)", lambda m: m[:-1, :-1]),
    ("non-finite", lambda m: m.clone().fill_diagonal_(float("nan"))),
])
def test_cache_file_with_right_key_but_bad_matrix_is_recomputed(problem, make_bad, embedded_tokenizer, corpus_file,
                                                                 tmp_path):
    tok = embedded_tokenizer
    model = tiny("gpt2", tok)
    layer_module = EDITED["gpt2"].format(1)
    good = second_moment(model, tok, layer_module, tmp_path, corpus_file)
    with safe_open(str(good.cache_path), framework="pt") as f:
        key = json.loads(f.metadata()["key"])
    write_cache(good.cache_path, key, make_bad(good.matrix), good.n_tokens, good.n_texts, good.corpus)
    again = second_moment(model, tok, layer_module, tmp_path, corpus_file)
    assert again.cache.startswith("recomputed:") and problem in again.cache
    assert torch.equal(again.matrix, good.matrix)


def test_seed_multiplier_layer_change_the_cache_path(embedded_tokenizer, corpus_file, tmp_path):
    tok = embedded_tokenizer
    model = tiny("llama", tok)
    stats = tmp_path / "stats"
    base = second_moment(model, tok, EDITED["llama"].format(1), stats, corpus_file)
    variants = [
        second_moment(model, tok, EDITED["llama"].format(1), stats, corpus_file, seed=7),
        second_moment(model, tok, EDITED["llama"].format(1), stats, corpus_file, dynamic_multiplier=2),
        second_moment(model, tok, EDITED["llama"].format(2), stats, corpus_file),
    ]
    paths = {base.cache_path} | {v.cache_path for v in variants}
    assert len(paths) == 4 and all(v.cache == "miss" for v in variants)
    assert "tokens128" in variants[1].cache_path.name and "tokens192" in base.cache_path.name


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_forward_stops_after_edited_module(arch, embedded_tokenizer, corpus_file, tmp_path):
    tok = embedded_tokenizer
    model = tiny(arch, tok)
    layer_module = EDITED[arch].format(1)
    fired = []
    for name in LATER[arch] + [layer_module]:
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: fired.append(name))
    second_moment(model, tok, layer_module, tmp_path / "stats", corpus_file)
    assert set(fired) == {layer_module}


def test_n_samples_mode_counts_every_token_of_n_articles(embedded_tokenizer, corpus_file, tmp_path):
    tok = embedded_tokenizer
    model = tiny("gpt2", tok)
    layer_module = EDITED["gpt2"].format(0)
    result = second_moment(model, tok, layer_module, tmp_path / "stats", corpus_file, dynamic=False, n_samples=3,
                           max_length=16)
    assert result.n_texts == 3 and result.n_tokens == 3 * 16  # every article is longer than 16 tokens
    assert "articles3" in result.cache_path.name
    articles = split_articles(corpus_file.read_text())
    texts = sample_token_ids(tok, articles, seed=0, max_length=16, n_articles=3)
    full = [tok(a)["input_ids"][:16] for a in articles]
    assert all(ids in full for ids in texts) and len({tuple(ids) for ids in texts}) == 3
    assert rel_err(result.matrix, independent_mean_kkT(model, layer_module, texts)) < 1e-10


def test_too_small_corpus_is_a_clear_error(embedded_tokenizer, corpus_file, tmp_path):
    tok = embedded_tokenizer
    model = tiny("llama", tok)
    layer_module = EDITED["llama"].format(1)
    with pytest.raises(ValueError, match=r"only \d+ tokens .* cap needs 64000"):
        second_moment(model, tok, layer_module, tmp_path / "stats", corpus_file, dynamic_multiplier=1000)
    with pytest.raises(ValueError, match=r"only 8 non-empty articles but mom2_n_samples is 100"):
        second_moment(model, tok, layer_module, tmp_path / "stats", corpus_file, dynamic=False, n_samples=100)



def test_mom2_dtype_follows_the_loaded_model(embedded_tokenizer, corpus_file, tmp_path):
    """Reference hparams say "float32" for fp16 models too: keys run in the model's dtype, recorded in the key."""
    tok = embedded_tokenizer
    model = tiny("llama", tok)  # loaded in float64
    layer_module = EDITED["llama"].format(1)
    as_float32 = second_moment(model, tok, layer_module, tmp_path / "stats", corpus_file, dtype="float32")
    as_float64 = second_moment(model, tok, layer_module, tmp_path / "stats", corpus_file, dtype="float64")
    assert as_float64.cache == "hit" and as_float32.cache_path == as_float64.cache_path
    assert "_float64_" in as_float32.cache_path.name


def test_hub_fallback_records_source_and_hits_offline(embedded_tokenizer, tmp_path, monkeypatch):
    tok = embedded_tokenizer
    model = tiny("llama", tok)
    layer_module = EDITED["llama"].format(1)
    articles = split_articles(wikitext_corpus())
    tried = []

    def load_dataset(path, config, split, streaming):
        tried.append(path)
        if path != "wikimedia/wikipedia":
            raise ConnectionError("offline")
        return iter({"text": a} for a in articles)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    stats = tmp_path / "stats"
    result = second_moment(model, tok, layer_module, stats, "wikipedia")
    assert tried == ["wikipedia", "wikimedia/wikipedia"]
    assert result.corpus.startswith("wikimedia/wikipedia 20231101.en") and result.n_tokens == 192
    assert "wikimedia_wikipedia-20231101.en" in str(result.cache_path)

    tried.clear()
    assert second_moment(model, tok, layer_module, stats, "wikipedia").cache == "hit" and tried == []

    monkeypatch.setitem(sys.modules, "datasets", None)  # the package is not installed
    with pytest.raises(RuntimeError, match="needs the `datasets` package .* local corpus"):
        second_moment(model, tok, layer_module, tmp_path / "empty", "wikitext-103")


def test_shared_wikitext2_directory(embedded_tokenizer, tmp_path):
    corpus = shared_path("data", "wikitext-2")
    tok = embedded_tokenizer
    model = tiny("gpt2", tok)
    result = second_moment(model, tok, EDITED["gpt2"].format(1), tmp_path / "stats", corpus)
    assert result.n_tokens == 192
    assert result.corpus == f"wikitext-2 (local: {corpus.resolve()})"
    assert "/tiny_model/wikitext-2/transformer.h.1.mlp.c_proj_float64_tokens192_" in str(result.cache_path)
