"""C0 at scale (SPEC §10): one pass for several layers, float32 products, OOM back-off, torchrun, published .npz."""
import io
import json
import logging
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from algs import get_algorithm
from algs.distribute import EditOptions, layer_moments
from algs.second_moment import layer_second_moment, layer_second_moments
from algs.state import EditState
from algs.stats_accumulate import DEFAULT_BATCH_TOKENS, _batches
from algs.stats_corpus import sample_token_ids, split_articles
from tests.conftest import make_tiny_model
from tests.test_second_moment import D_MLP, MAX_POSITIONS, count_forwards, rel_err
from util.errors import InputError
from util.tracing import run_until, trace_modules

REPO = Path(__file__).resolve().parents[1]
LLAMA = "model.layers.{}.mlp.down_proj"
MODEL_ID = "tiny/model"


@pytest.fixture
def model(embedded_tokenizer):
    return make_tiny_model("llama", embedded_tokenizer, d_mlp=D_MLP).double()


def options(stats_dir, corpus, **overrides):
    return {"corpus": str(corpus), "dynamic": True, "dynamic_multiplier": 3, "n_samples": 0, "model_id": MODEL_ID,
            "model_revision": "r0", "stats_dir": stats_dir, "dtype": "float64", "seed": 0, "batch_tokens": 300,
            **overrides}


def modules(*layers):
    return [LLAMA.format(layer) for layer in layers]


def per_batch_reference(model, tok, module, corpus, batch_tokens):
    """C0 as the single-layer code computed it before the one-pass change: per batch, a traced forward pass
    stopped after the module, keys.T @ keys of the non-pad tokens added into a float64 total."""
    texts = sample_token_ids(tok, split_articles(Path(corpus).read_text()), seed=0, max_length=MAX_POSITIONS,
                             n_tokens=3 * D_MLP)
    total = torch.zeros(D_MLP, D_MLP, dtype=torch.float64)
    for batch in _batches(texts, batch_tokens):
        longest = max(map(len, batch))
        input_ids = torch.full((len(batch), longest), tok.pad_token_id)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        with torch.no_grad(), trace_modules(model, [module], retain_input=True, retain_output=False,
                                            stop_after=module) as traces:
            run_until(model, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        keys = traces[module].input[attention_mask.bool()].to(torch.float64)
        total += keys.T @ keys
    mean = total / sum(map(len, texts))
    return (mean + mean.T) / 2


# ---------------------------------------------------------------- one pass for several layers

def test_one_pass_equals_per_layer_exactly_and_stops_after_the_deepest(model, embedded_tokenizer, corpus_file,
                                                                        tmp_path):
    tok = embedded_tokenizer
    calls = count_forwards(model)
    single = {name: layer_second_moment(model, tok, name, **options(tmp_path / "single", corpus_file))
              for name in modules(0, 1, 2)}
    per_layer_calls = len(calls)
    fired = []
    for name in ("model.layers.3", "model.norm", "lm_head"):
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: fired.append(name))
    together = layer_second_moments(model, tok, modules(2, 0, 1), **options(tmp_path / "together", corpus_file))
    assert len(calls) - per_layer_calls == per_layer_calls // 3 > 0  # one pass instead of three
    assert fired == []  # nothing after the deepest module (layer 2) ran
    assert list(together) == modules(2, 0, 1)
    for name, moment in together.items():
        assert moment.cache == "miss" and moment.n_tokens == 3 * D_MLP
        assert torch.equal(moment.matrix, single[name].matrix)
        assert torch.equal(moment.matrix, per_batch_reference(model, tok, name, corpus_file, 300))
        assert moment.cache_path.name == single[name].cache_path.name  # same key: caches stay valid


def test_second_call_hits_the_cache_and_a_partial_cache_computes_only_the_missing(model, embedded_tokenizer,
                                                                                   corpus_file, tmp_path):
    tok = embedded_tokenizer
    stats = tmp_path / "stats"
    first = layer_second_moment(model, tok, LLAMA.format(2), **options(stats, corpus_file))
    calls = count_forwards(model)
    fired = []
    model.get_submodule("model.layers.2").register_forward_hook(lambda m, a, o: fired.append(2))
    mixed = layer_second_moments(model, tok, modules(0, 1, 2), **options(stats, corpus_file))
    assert [m.cache for m in mixed.values()] == ["miss", "miss", "hit"]
    assert torch.equal(mixed[LLAMA.format(2)].matrix, first.matrix)
    assert fired == [] and len(calls) > 0  # the pass stopped after layer 1, the deepest missing one
    n_calls = len(calls)
    again = layer_second_moments(model, tok, modules(0, 1, 2), **options(stats, corpus_file))
    assert len(calls) == n_calls and all(m.cache == "hit" for m in again.values())
    assert all(torch.equal(again[name].matrix, mixed[name].matrix) for name in mixed)


def test_distribute_asks_for_every_edited_layer_at_once(model, embedded_tokenizer, corpus_file, tmp_path):
    tok = embedded_tokenizer
    hparams_class, _ = get_algorithm("MEMIT")
    hp = hparams_class.from_dict({"layers": [0, 1, 2], "v_num_grad_steps": 1, "v_lr": 0.5, "v_loss_layer": 3,
                                  "v_weight_decay": 1e-3, "clamp_norm_factor": 4.0, "kl_factor": 0.0625,
                                  "context_template_length_params": [[5, 1]], "mom2_dataset": str(corpus_file),
                                  "dynamic": True, "dynamic_multiplier": 3, "mom2_update_weight": 100.0,
                                  "mom2_dtype": "float64"})
    single_calls = count_forwards(model)
    layer_second_moment(model, tok, LLAMA.format(0), **options(tmp_path / "one", corpus_file, model_id="x",
                                                               batch_tokens=DEFAULT_BATCH_TOKENS))
    calls = count_forwards(model)
    state, edit_options = EditState(), EditOptions(stats_dir=tmp_path / "stats")
    moments = layer_moments(model, tok, hp, state, edit_options)
    assert sorted(moments) == [0, 1, 2] and all(m.cache == "miss" and m.n_tokens == 3 * D_MLP
                                                for m in moments.values())
    assert len(calls) == len(single_calls) // 2  # one pass (the single-layer call above made the other half)
    assert layer_moments(model, tok, hp, state, edit_options) == moments  # in memory


def test_float32_products_are_keyed_apart_and_close(model, embedded_tokenizer, corpus_file, tmp_path):
    tok = embedded_tokenizer
    wide = layer_second_moments(model, tok, modules(0, 1), **options(tmp_path, corpus_file))
    narrow = layer_second_moments(model, tok, modules(0, 1), **options(tmp_path, corpus_file,
                                                                        accumulate_dtype="float32"))
    for name in wide:
        assert narrow[name].cache == "miss" and narrow[name].cache_path != wide[name].cache_path
        assert narrow[name].matrix.dtype == torch.float64 and 0 < rel_err(narrow[name].matrix, wide[name].matrix) < 1e-6
    with safe_open(str(narrow[LLAMA.format(0)].cache_path), framework="pt") as f:
        assert json.loads(f.metadata()["key"])["accumulate_dtype"] == "float32"
    with pytest.raises(ValueError, match="accumulate_dtype must be one of"):
        layer_second_moments(model, tok, modules(0), **options(tmp_path, corpus_file, accumulate_dtype="float16"))


# ---------------------------------------------------------------- out-of-memory back-off

def fail_big_forwards(monkeypatch, model, max_rows, times):
    """model.forward raises a CUDA-style out-of-memory error `times` times for inputs of more than max_rows texts."""
    forward, failures = model.forward, []

    def forward_or_oom(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > max_rows and len(failures) < times:
            failures.append(kwargs["input_ids"].shape[0])
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward_or_oom)
    return failures


def test_out_of_memory_halves_the_budget_and_gives_the_same_c0(model, embedded_tokenizer, corpus_file, tmp_path,
                                                              monkeypatch, caplog):
    tok = embedded_tokenizer
    normal = layer_second_moments(model, tok, modules(0, 2), **options(tmp_path / "a", corpus_file, batch_tokens=4096))
    failures = fail_big_forwards(monkeypatch, model, max_rows=1, times=1)
    with caplog.at_level(logging.WARNING, logger="algs.second_moment"):
        backed_off = layer_second_moments(model, tok, modules(0, 2),
                                          **options(tmp_path / "b", corpus_file, batch_tokens=4096))
    assert len(failures) == 1 and failures[0] > 1
    assert any("out of memory" in record.getMessage() for record in caplog.records)
    for name in normal:
        assert torch.equal(backed_off[name].matrix, normal[name].matrix)


def test_out_of_memory_at_one_text_and_other_errors_are_raised(model, embedded_tokenizer, corpus_file, tmp_path,
                                                              monkeypatch):
    tok = embedded_tokenizer
    failures = fail_big_forwards(monkeypatch, model, max_rows=0, times=100)
    with pytest.raises(RuntimeError, match="out of memory"):
        layer_second_moments(model, tok, modules(1), **options(tmp_path, corpus_file, batch_tokens=4096))
    assert failures[-1] == 1 and failures[0] > 1  # halved down to one text, then raised

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(model, "forward", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        layer_second_moments(model, tok, modules(1), **options(tmp_path, corpus_file))


# ---------------------------------------------------------------- torchrun

def test_torchrun_two_processes_equal_one_process(embedded_tokenizer, corpus_file, tmp_path, monkeypatch):
    from scripts import collect_stats

    tok = embedded_tokenizer
    model_dir = tmp_path / "tiny-llama"
    make_tiny_model("llama", tok, d_mlp=D_MLP).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    hparams = tmp_path / "hparams.json"
    hparams.write_text(json.dumps({"layers": [1, 2], "mom2_dataset": str(corpus_file), "mom2_n_samples": 1,
                                   "mom2_dtype": "float32", "dynamic": True, "dynamic_multiplier": 6}))
    # one text per forward pass in both runs: a float32 text's keys then do not depend on its batch mates
    args = ["--model_name", str(model_dir), "--hparams", str(hparams), "--batch_tokens", "1"]
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    # One thread here as in torchrun's workers (OMP_NUM_THREADS=1): float32 kernels differ in the last bits
    # between thread counts, which would swamp the summation-order difference this test is about.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert collect_stats.main(args + ["--stats_dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "scripts" / "collect_stats.py"), *args, "--stats_dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("layer ") == 2  # rank 0 reports, rank 1 does not
    one = sorted((tmp_path / "one").rglob("*.safetensors"))
    two = sorted((tmp_path / "two").rglob("*.safetensors"))
    assert len(one) == 2 and [p.relative_to(tmp_path / "one") for p in one] == [
        p.relative_to(tmp_path / "two") for p in two]
    for a, b in zip(one, two):
        with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
            assert fa.metadata() == fb.metadata()
            assert rel_err(fb.get_tensor("matrix"), fa.get_tensor("matrix")) <= 1e-10


# ---------------------------------------------------------------- published .npz statistics

def write_reference_npz(path: Path, raw_moment: np.ndarray, count, **extra) -> Path:
    """An .npz as the reference's tally saves CombinedStat(mom2=SecondMoment()).state_dict() with sample_size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mom2.constructor": np.array("util.runningstats.SecondMoment()"), "mom2.count": np.array(count),
              "mom2.mom2": raw_moment, "sample_size": np.array(100000), **extra}
    np.savez(path, **arrays)
    return path


def npy_bytes(array: np.ndarray) -> bytes:
    """A plain .npy file's bytes (one array, not an archive)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def reference_file(root: Path, layer: int) -> Path:
    return root / "tiny_model" / "wikipedia_stats" / f"{LLAMA.format(layer)}_float32_mom2_100000.npz"


def test_published_npz_loads_to_our_c0_with_provenance_and_is_cached(model, embedded_tokenizer, corpus_file,
                                                                   tmp_path):
    tok = embedded_tokenizer
    ours = layer_second_moments(model, tok, modules(1, 2), **options(tmp_path / "ours", corpus_file))
    published = tmp_path / "published"
    for layer in (1, 2):
        ours_moment = ours[LLAMA.format(layer)]
        raw = (ours_moment.matrix * ours_moment.n_tokens).to(torch.float32).numpy()  # Σ k kᵀ as the reference keeps it
        write_reference_npz(reference_file(published, layer), raw, ours_moment.n_tokens)
    write_reference_npz(published / "other_model" / "wikipedia_stats" / reference_file(published, 1).name,
                        np.eye(D_MLP, dtype=np.float32), 5)  # another model's file: the model's folder wins
    stats = tmp_path / "stats"
    loaded = layer_second_moments(model, tok, modules(1, 2), **options(stats, "no-corpus-needed",
                                                                        published_stats_dir=published))
    for layer in (1, 2):
        name, path = LLAMA.format(layer), reference_file(published, layer)
        moment = loaded[name]
        assert moment.cache == "miss" and moment.n_tokens == 3 * D_MLP and moment.n_texts == 100000
        assert moment.matrix.dtype == torch.float64 and torch.equal(moment.matrix, moment.matrix.T)
        assert rel_err(moment.matrix, ours[name].matrix) < 1e-6
        assert moment.provenance["path"] == str(path.resolve()) and moment.provenance["count"] == 3 * D_MLP
        assert moment.provenance["sha256"] in moment.corpus and moment.provenance["dtype"] == "float32"
        assert moment.cache_path.is_file() and moment.cache_path.is_relative_to(stats)
    again = layer_second_moment(model, tok, LLAMA.format(1), **options(stats, "x", published_stats_dir=published))
    assert again.cache == "hit" and torch.equal(again.matrix, loaded[LLAMA.format(1)].matrix)
    assert again.provenance == loaded[LLAMA.format(1)].provenance
    one_file = layer_second_moment(model, tok, LLAMA.format(2),
                                   **options(stats, "x", published_stats_dir=reference_file(published, 2)))
    assert one_file.cache == "hit" and torch.equal(one_file.matrix, loaded[LLAMA.format(2)].matrix)


@pytest.mark.parametrize("problem, write", [
    ("expected a float (64, 64) matrix", lambda path: write_reference_npz(path, np.eye(63, dtype=np.float32), 10)),
    ("count is 0, expected a positive whole number",
     lambda path: write_reference_npz(path, np.eye(D_MLP, dtype=np.float32), 0)),
    ("count is 2.5", lambda path: write_reference_npz(path, np.eye(D_MLP, dtype=np.float32), 2.5)),
    ("no mom2 and count arrays", lambda path: np.savez(path, mean=np.zeros(D_MLP))),
    ("reads only with pickle", lambda path: write_reference_npz(
        path, np.eye(D_MLP, dtype=np.float32), 10, **{"mom2.constructor": np.array([{"a": 1}], dtype=object)})),
    ("reads only with pickle", lambda path: path.write_bytes(pickle.dumps({"mom2.mom2": np.eye(D_MLP)}))),
    ("a single array", lambda path: path.write_bytes(npy_bytes(np.eye(D_MLP)))),
])
def test_bad_published_files_are_input_errors(problem, write, model, embedded_tokenizer, tmp_path):
    path = reference_file(tmp_path / "published", 1)
    path.parent.mkdir(parents=True)
    write(path)
    with pytest.raises(InputError, match=re.escape(problem)) as raised:
        layer_second_moment(model, embedded_tokenizer, LLAMA.format(1),
                            **options(tmp_path / "stats", "x", published_stats_dir=tmp_path / "published"))
    assert raised.value.where == str(path.resolve()) and raised.value.fix
    assert not (tmp_path / "stats").exists()


def test_published_folder_without_the_layer_is_an_input_error(model, embedded_tokenizer, tmp_path):
    write_reference_npz(reference_file(tmp_path / "published", 1), np.eye(D_MLP, dtype=np.float32), 10)
    with pytest.raises(InputError, match=r"0 files match model\.layers\.2\.mlp\.down_proj_\*mom2\*\.npz"):
        layer_second_moments(model, embedded_tokenizer, modules(1, 2),
                             **options(tmp_path / "stats", "x", published_stats_dir=tmp_path / "published"))
