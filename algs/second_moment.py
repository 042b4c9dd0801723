"""Second-moment statistics C0 = E[k kᵀ] of the keys at the input of an edited matrix W (SPEC §4).

Keys are read over a fixed, seeded sample of corpus texts fed through the unedited model; the forward
pass stops right after W. FastMEMIT's cap (`dynamic`) counts exactly round(multiplier × d_k) tokens;
otherwise `n_samples` whole articles are counted. Accumulation is in float64. Results are cached on
disk under a key naming everything that determines them; a corrupt or mismatched file is recomputed.

Choices the references leave open, made explicit here:
- Texts are truncated at max_length, by default the model's maximum positions as in the references (1,024 for
  GPT-2, 2,048 for GPT-J, 4,096/8,192 for Llama-2/3); hparams `mom2_max_length` sets it (our smollm2 files: 1,024).
- Texts are tokenized with the tokenizer's special tokens (a BOS where the tokenizer adds one), as the
  references' TokenizedDataset does.
- Hub corpora are streamed; the sample is drawn from the first `pool_articles` articles of the stream
  (HUB_POOL_ARTICLES, or n_samples when larger), shuffled with the seed, not from the whole corpus.
- For "wikipedia", a valid cache file of any fallback source is used before trying to load the hub
  (so precomputed stats work offline); the file names the source it was computed from.

Scale (SPEC §10): every missing layer of one request is collected in one pass over the sample (hooks on
each module's input, the pass stops once the last of them has run), each still cached in its own file.
With `distributed`, rank r of W reads texts r, r+W, … and the float64 sums and token counts are
all-reduced; rank 0 writes the cache, the others read it after a barrier. A batch that runs out of memory
is run again in smaller forward chunks of the same padded width, its keys gathered and accumulated as one
product, so the numbers do not depend on the chunking. The reference repos' published `.npz` statistics
(runningstats SecondMoment state: raw moment `mom2` and `count`) are read without pickle and cached here.
"""
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from algs.stats_accumulate import (ACCUMULATE_DTYPES, DEFAULT_BATCH_TOKENS, _agreed, _rank_and_world,
                                   accumulate_key_products, key_dim, mean_from_total)
from algs.stats_cache import SecondMoment, cache_key, cache_path, published_second_moment, read_cache, write_cache
from algs.stats_corpus import HUB_POOL_ARTICLES, CorpusSource, corpus_sources, load_articles, sample_token_ids
from util import globals as G
from util.arch import get_module

log = logging.getLogger(__name__)

FALLBACK_MAX_LENGTH = 1024  # for a config that names no maximum positions
FORWARD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}


def default_max_length(model) -> int:
    """The references' truncation: the model's maximum positions."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return positions or FALLBACK_MAX_LENGTH


# ---------------------------------------------------------------- entry point

def _forward_dtype(model, dtype: str) -> str:
    """The dtype keys are really computed in: the loaded model's (an fp16 model with the reference files'
    "float32" must still work)."""
    if dtype not in FORWARD_DTYPES:
        raise ValueError(f"mom2_dtype must be one of {sorted(FORWARD_DTYPES)}, got {dtype!r}")
    model_dtype = next(model.parameters()).dtype
    if model_dtype != FORWARD_DTYPES[dtype]:
        forward_dtype = str(model_dtype).removeprefix("torch.")
        log.info("mom2_dtype is %s but the model is loaded in %s: keys are computed in %s, accumulated in float64",
                 dtype, forward_dtype, forward_dtype)
        return forward_dtype
    return dtype


def _sample(dynamic: bool, dynamic_multiplier: float, n_samples: int, d_k: int) -> dict:
    if not dynamic:
        return {"mode": "articles", "n": int(n_samples)}
    sample = {"mode": "tokens", "n": round(dynamic_multiplier * d_k)}
    if sample["n"] < 1:
        raise ValueError(f"dynamic_multiplier {dynamic_multiplier} × d_k {d_k} gives no tokens")
    return sample


def layer_second_moment(model, tok, layer_module: str, **options) -> SecondMoment:
    """C0 for the edited matrix `layer_module` (options: those of layer_second_moments)."""
    return layer_second_moments(model, tok, [layer_module], **options)[layer_module]


def layer_second_moments(model, tok, layer_modules: list[str], *, corpus: str, dynamic: bool,
                         dynamic_multiplier: float, n_samples: int, model_id: str, model_revision: str,
                         max_length: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                         stats_dir: Path | None = None, dtype: str = "float32", seed: int = 0, device=None,
                         accumulate_dtype: str = "float64", distributed: bool = False,
                         published_stats_dir: Path | None = None) -> dict:
    """{module: C0} for the edited matrices `layer_modules`: valid cache files are read, the missing ones are
    computed together in one pass over the sample (one pass per sample size, when their d_k differ).

    dtype is the hparams' mom2_dtype. Keys are computed in the dtype the model is loaded in and accumulated in
    float64; the cache key records the forward dtype actually used. accumulate_dtype "float32" forms each
    batch's k kᵀ in float32 before adding it into the float64 total (recorded in the cache key).
    distributed: torch.distributed is initialised and every rank calls this alike; the stats_dir is shared.
    published_stats_dir: read the reference repos' .npz statistics from there (a folder or one file) instead.
    """
    layer_modules = list(dict.fromkeys(layer_modules))
    if accumulate_dtype not in ACCUMULATE_DTYPES:
        raise ValueError(f"accumulate_dtype must be one of {sorted(ACCUMULATE_DTYPES)}, got {accumulate_dtype!r}")
    stats_dir = Path(stats_dir) if stats_dir is not None else G.stats_dir()
    if published_stats_dir is not None:
        return {name: published_second_moment(published_stats_dir, model, name, model_id=model_id,
                                               model_revision=model_revision, stats_dir=stats_dir)
                for name in layer_modules}
    dtype = _forward_dtype(model, dtype)
    if model.training:
        raise ValueError("the model is in training mode (dropout would randomise the keys); call model.eval()")
    device = device if device is not None else next(model.parameters()).device
    max_length = max_length or default_max_length(model)
    d_ks = {name: key_dim(get_module(model, name)) for name in layer_modules}
    samples = {name: _sample(dynamic, dynamic_multiplier, n_samples, d_ks[name]) for name in layer_modules}
    pool_articles = HUB_POOL_ARTICLES if dynamic else max(HUB_POOL_ARTICLES, int(n_samples))
    sources = corpus_sources(corpus, pool_articles)

    def key_for(name, source):
        key = cache_key(model_id=model_id, model_revision=model_revision, layer_module=name, source=source,
                        sample=samples[name], max_length=max_length, seed=seed, dtype=dtype)
        if accumulate_dtype != "float64":  # float64 keys stay as they were: existing caches remain valid
            key["accumulate_dtype"] = accumulate_dtype
        return key

    results, problems = {}, {}
    for name in layer_modules:
        for source in sources:
            key = key_for(name, source)
            path = cache_path(stats_dir, key, source)
            stored, problem = read_cache(path, key, d_ks[name])
            if stored is not None:
                log.info("C0 %s: cache hit %s", name, path)
                results[name] = SecondMoment(stored["matrix"], stored["n_tokens"], stored["n_texts"],
                                             stored["corpus"], "hit", path)
                break
            if problem is not None:
                log.warning("C0 %s: cache file %s is not usable (%s); recomputing", name, path, problem)
                problems[path] = problem
    missing = _agreed([name for name in layer_modules if name not in results], distributed)
    unseen = [name for name in layer_modules if name not in missing and name not in results]
    if unseen:
        raise RuntimeError(f"rank {dist.get_rank()} finds no cache file for {unseen} where rank 0 does: give all "
                           "ranks one shared stats_dir")
    if missing:
        source, articles = load_articles(corpus, sources)
        for sample in dict.fromkeys(json.dumps(samples[name], sort_keys=True) for name in missing):  # same order on all ranks
            group = [name for name in missing if json.dumps(samples[name], sort_keys=True) == sample]
            results.update(_compute_moments(
                model, tok, group, texts=sample_token_ids(
                    tok, articles, seed=seed, max_length=max_length,
                    n_tokens=samples[group[0]]["n"] if dynamic else None,
                    n_articles=None if dynamic else samples[group[0]]["n"]),
                source=source, keys={name: key_for(name, source) for name in group}, stats_dir=stats_dir,
                problems=problems, batch_tokens=batch_tokens, device=device,
                accumulate_dtype=ACCUMULATE_DTYPES[accumulate_dtype], distributed=distributed))
    return {name: results[name] for name in layer_modules}


def _compute_moments(model, tok, layer_modules: list[str], *, texts: list[list[int]], source: CorpusSource,
                     keys: dict, stats_dir: Path, problems: dict, batch_tokens: int, device,
                     accumulate_dtype: torch.dtype, distributed: bool) -> dict:
    """C0 of `layer_modules` from one pass over `texts` (this rank's share of them when distributed), written
    to the cache by rank 0; the other ranks wait and read what rank 0 wrote."""
    rank, world = _rank_and_world(distributed)
    share = texts[rank::world]
    pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0  # pads are masked: any id works
    totals = accumulate_key_products(model, layer_modules, share, pad_token_id=pad_token_id,
                                     batch_tokens=batch_tokens, device=device, accumulate_dtype=accumulate_dtype)
    n_counted = sum(len(ids) for ids in texts)
    if distributed:
        for total in totals.values():
            dist.all_reduce(total)
        count = torch.tensor([sum(len(ids) for ids in share)], dtype=torch.int64, device=device)
        dist.all_reduce(count)
        if count.item() != n_counted:
            raise RuntimeError(f"the ranks counted {count.item()} tokens, the sample has {n_counted}")
    results = {}
    for name in layer_modules:
        path = cache_path(stats_dir, keys[name], source)
        status = f"recomputed: {problems[path]}" if path in problems else "miss"
        matrix = mean_from_total(totals[name], n_counted)
        if rank == 0:
            write_cache(path, keys[name], matrix, n_counted, len(texts), source.description)
            log.info("C0 %s: %s; %d tokens of %d texts from %s -> %s", name, status, n_counted, len(texts),
                     source.description, path)
        results[name] = SecondMoment(matrix, n_counted, len(texts), source.description, status, path)
    if distributed:
        dist.barrier()
        if rank != 0:
            results = {name: _written_by_rank0(results[name], keys[name], totals[name].shape[0])
                       for name in layer_modules}
    return results


def _written_by_rank0(moment: SecondMoment, key: dict, d_k: int) -> SecondMoment:
    stored, problem = read_cache(moment.cache_path, key, d_k)
    if stored is None:
        raise RuntimeError(f"cannot read {moment.cache_path} that rank 0 wrote ({problem or 'absent'}): give all "
                           "ranks one shared stats_dir")
    return SecondMoment(stored["matrix"], stored["n_tokens"], stored["n_texts"], stored["corpus"], moment.cache,
                        moment.cache_path)

