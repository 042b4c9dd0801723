"""Second-moment statistics C0 = E[k kᵀ] of the keys at the input of an edited matrix W (SPEC §4).

Keys are read over a fixed, seeded sample of corpus texts fed through the unedited model; the forward
pass stops right after W. FastMEMIT's cap (`dynamic`) counts exactly round(multiplier × d_k) tokens;
otherwise `n_samples` whole articles are counted. Accumulation is in float64. Results are cached on
disk under a key naming everything that determines them; a corrupt or mismatched file is recomputed.

Choices the references leave open, made explicit here:
- max_length defaults to the model's maximum positions capped at MAX_LENGTH_CAP (bounds memory).
- Texts are tokenized with the tokenizer's special tokens (a BOS where the tokenizer adds one), as the
  references' TokenizedDataset does.
- Hub corpora are streamed; the sample is drawn from the first `pool_articles` articles of the stream
  (HUB_POOL_ARTICLES, or n_samples when larger), shuffled with the seed, not from the whole corpus.
- For "wikipedia", a valid cache file of any fallback source is used before trying to load the hub
  (so precomputed stats work offline); the file names the source it was computed from.
"""
import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from util import globals as G
from util.arch import get_module, is_conv1d
from util.errors import InputError
from util.tracing import run_until, trace_modules
from util.io import write_tensors_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_LENGTH_CAP = 1024
DEFAULT_BATCH_TOKENS = 4096
HUB_POOL_ARTICLES = 10_000
FORWARD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}
WIKITEXT_103 = ("wikitext", "wikitext-103-raw-v1")
HUB_CORPORA = {  # corpus name -> (dataset path, config) tried in order; the first that loads is used
    "wikipedia": [("wikipedia", "20200501.en"), ("wikimedia/wikipedia", "20231101.en"), WIKITEXT_103],
    "wikitext-103": [WIKITEXT_103],
}
LOCAL_SUFFIXES = (".txt", ".raw")


class CorpusUnavailable(RuntimeError):
    """The statistics corpus cannot be loaded here (no `datasets` package, no network, no such source)."""


@dataclass(frozen=True)
class SecondMoment:
    matrix: torch.Tensor  # (d_k, d_k) float64 on CPU: the mean of k kᵀ
    n_tokens: int
    n_texts: int
    corpus: str  # the corpus really used
    cache: str  # "hit", "miss" or "recomputed: <why>"
    cache_path: Path


# ---------------------------------------------------------------- corpora

def _is_wikitext_title(line: str) -> bool:
    """WikiText marks an article title as ' = Title = ' and sections as ' = = Section = = '."""
    stripped = line.strip()
    return len(stripped) > 4 and stripped.startswith("= ") and stripped.endswith(" =") and stripped[2] != "="


def split_articles(text: str) -> list[str]:
    """WikiText articles (split at title lines), else paragraphs separated by blank lines; no empties."""
    lines = text.splitlines()
    if any(_is_wikitext_title(line) for line in lines):
        articles, current = [], []
        for line in lines:
            if _is_wikitext_title(line) and current:
                articles.append("\n".join(current))
                current = []
            current.append(line)
        articles.append("\n".join(current))
    else:
        articles = re.split(r"\n\s*\n", "\n".join(lines))
    return [article.strip() for article in articles if article.strip()]


@dataclass(frozen=True)
class CorpusSource:
    """One place texts can come from: `key` identifies it (for the cache) without loading it."""
    description: str
    dir_name: str  # readable folder name in the cache
    key: dict
    local_files: tuple = ()  # set for a local corpus
    hub: tuple = ()  # (dataset path, config) for a hub corpus


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if files:
            return files
        raise InputError(f"no {'/'.join(LOCAL_SUFFIXES)} files", f"the statistics corpus directory {path}",
                         "put the corpus text there, or pass another corpus (hparams mom2_dataset, --stats_corpus)")
    raise InputError(f"statistics corpus {str(path)!r} not found", "hparams mom2_dataset / --stats_corpus",
                     f"give a text file, a directory of {'/'.join(LOCAL_SUFFIXES)} files, or one of "
                     f"{sorted(HUB_CORPORA)}")


def read_corpus_file(path: Path) -> str:
    """A local corpus file's text; an error naming the file when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"text that is not UTF-8 ({error.reason} at byte {error.start})", f"corpus file {path}",
                         "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out of the corpus") from None


def check_corpus(corpus: str) -> None:
    """Before a model loads: a local corpus exists and is UTF-8 text (a hub corpus is checked when it loads)."""
    if corpus not in HUB_CORPORA:
        for path in _local_files(Path(corpus).expanduser().resolve()):
            read_corpus_file(path)


def corpus_sources(corpus: str, pool_articles: int) -> list[CorpusSource]:
    """The candidate sources for `corpus` in the order they are tried."""
    if corpus in HUB_CORPORA:
        return [
            CorpusSource(
                description=f"{path} {config} (first {pool_articles} articles of train, streamed)",
                dir_name=_sanitise(f"{path}-{config}"),
                key={"kind": "hub", "path": path, "config": config, "split": "train",
                     "pool_articles": pool_articles},
                hub=(path, config),
            )
            for path, config in HUB_CORPORA[corpus]
        ]
    path = Path(corpus).expanduser().resolve()
    files = _local_files(path)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return [CorpusSource(
        description=f"{path.name} (local: {path})",
        dir_name=_sanitise(path.name),
        key={"kind": "local", "path": str(path), "files": [f.name for f in files], "sha256": digest.hexdigest()},
        local_files=tuple(files),
    )]


def _hub_articles(path: str, config: str, pool_articles: int) -> list[str]:
    """The first `pool_articles` articles of a streamed hub dataset (WikiText rows are lines: grouped)."""
    import datasets  # lazy: optional dependency, needs network

    rows = datasets.load_dataset(path, config, split="train", streaming=True)
    if (path, config) != WIKITEXT_103:
        articles = []
        for row in rows:
            if row["text"].strip():
                articles.append(row["text"])
            if len(articles) == pool_articles:
                break
        return articles
    lines, titles = [], 0
    for row in rows:
        if _is_wikitext_title(row["text"]):
            titles += 1
            if titles > pool_articles:
                break
        lines.append(row["text"].rstrip("\n"))
    return split_articles("\n".join(lines))[:pool_articles]


def load_articles(corpus: str, sources: list[CorpusSource]) -> tuple[CorpusSource, list[str]]:
    """Articles of the first source of `corpus` that loads, and that source."""
    source = sources[0]
    if source.local_files:
        articles = [a for f in source.local_files for a in split_articles(read_corpus_file(f))]
        if not articles:
            raise ValueError(f"corpus {source.description} holds no text")
        return source, articles
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise CorpusUnavailable(
            f"corpus {corpus!r} needs the `datasets` package and network access "
            "(pip install datasets); offline, pass a local corpus instead: a text file or a directory of "
            ".txt/.raw files such as a WikiText-2 copy (hparams mom2_dataset, or --stats_corpus / --corpus)"
        ) from None
    failures = []
    for source in sources:
        try:
            articles = _hub_articles(*source.hub, source.key["pool_articles"])
        except Exception as error:  # hub/network/script errors come in many types; each is reported below
            failures.append(f"{source.hub[0]} {source.hub[1]}: {type(error).__name__}: {error}")
            log.info("corpus %s did not load: %s", source.description, failures[-1])
            continue
        if articles:
            return source, articles
        failures.append(f"{source.hub[0]} {source.hub[1]}: no articles")
    raise CorpusUnavailable(
        f"corpus {corpus!r}: no source loaded (" + "; ".join(failures) + "); offline, pass a local corpus instead: a text "
        "file or a directory of .txt/.raw files such as a WikiText-2 copy (hparams mom2_dataset, or --stats_corpus)"
    )


# ---------------------------------------------------------------- sample

def sample_token_ids(tok, articles: list[str], *, seed: int, max_length: int,
                     n_tokens: int | None = None, n_articles: int | None = None) -> list[list[int]]:
    """Token ids of the seeded sample: articles in seeded order, each truncated to max_length.

    n_tokens (FastMEMIT cap): exactly that many tokens, the last text cut to fit. n_articles: that many
    whole articles. Exactly one of the two is given; a corpus too small for it is an error.
    """
    if (n_tokens is None) == (n_articles is None):
        raise ValueError("give exactly one of n_tokens, n_articles")
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    texts, total = [], 0
    for index in order:
        if n_articles is not None and len(texts) == n_articles:
            break
        if n_tokens is not None and total == n_tokens:
            break
        ids = tok(articles[index], truncation=True, max_length=max_length)["input_ids"]
        if n_tokens is not None:
            ids = ids[: n_tokens - total]
        if ids:
            texts.append(ids)
            total += len(ids)
    if n_tokens is not None and total < n_tokens:
        raise ValueError(
            f"the corpus has only {total} tokens ({len(articles)} articles, each truncated to {max_length}) "
            f"but the cap needs {n_tokens}; use a bigger corpus or a smaller dynamic_multiplier"
        )
    if n_articles is not None and len(texts) < n_articles:
        raise ValueError(
            f"the corpus has only {len(texts)} non-empty articles but mom2_n_samples is {n_articles}; "
            "use a bigger corpus or a smaller mom2_n_samples"
        )
    return texts


def _batches(texts: list[list[int]], batch_tokens: int):
    """Consecutive texts grouped so that (number of texts × longest text) stays within batch_tokens."""
    batch, longest = [], 0
    for ids in texts:
        if batch and max(longest, len(ids)) * (len(batch) + 1) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(ids)
        longest = max(longest, len(ids))
    if batch:
        yield batch


def accumulate_second_moment(model, layer_module: str, texts: list[list[int]], *, pad_token_id: int,
                             batch_tokens: int, device) -> torch.Tensor:
    """Mean of k kᵀ (float64, on CPU) over every token of `texts`, k = the input of `layer_module`."""
    d_k = key_dim(get_module(model, layer_module))
    total = torch.zeros(d_k, d_k, dtype=torch.float64, device=device)
    n_tokens = sum(len(ids) for ids in texts)
    with torch.no_grad(), tqdm(total=n_tokens, desc=f"C0 {layer_module}", unit="tok") as progress:
        for batch in _batches(texts, batch_tokens):
            longest = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, ids in enumerate(batch):  # right padding: real tokens never see the pads
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            with trace_modules(model, [layer_module], retain_input=True, retain_output=False,
                               stop_after=layer_module) as traces:
                run_until(model, input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                          use_cache=False)
            counted = attention_mask.to(device).bool()
            keys = traces[layer_module].input[counted].to(torch.float64)
            total += keys.T @ keys
            progress.update(keys.shape[0])
    mean = total.cpu() / n_tokens
    return (mean + mean.T) / 2  # exactly symmetric; the cache check relies on it


def key_dim(module) -> int:
    """d_k: the input width of W (Conv1D stores W as (d_in, d_out), nn.Linear as (d_out, d_in))."""
    return module.weight.shape[0] if is_conv1d(module) else module.in_features


def default_max_length(model) -> int:
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(positions or MAX_LENGTH_CAP, MAX_LENGTH_CAP)


# ---------------------------------------------------------------- cache

def _sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "_"


def cache_key(*, model_id, model_revision, layer_module, source: CorpusSource, sample: dict, max_length,
              seed, dtype) -> dict:
    return {"format_version": FORMAT_VERSION, "model_id": model_id, "model_revision": model_revision,
            "layer_module": layer_module, "corpus": source.key, "sample": sample, "max_length": max_length,
            "seed": seed, "dtype": dtype, "special_tokens": True}


def cache_path(stats_dir: Path, key: dict, source: CorpusSource) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    size = f"{key['sample']['mode']}{key['sample']['n']}"
    name = f"{_sanitise(key['layer_module'])}_{key['dtype']}_{size}_{digest}.safetensors"
    return Path(stats_dir) / _sanitise(key["model_id"]) / source.dir_name / name


def read_cache(path: Path, key: dict, d_k: int) -> tuple[dict | None, str | None]:
    """(stored result, None) when the file is valid for `key`, else (None, what is wrong); (None, None): absent."""
    if not path.exists():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            matrix = f.get_tensor("matrix")
        stored_key = json.loads(metadata["key"])
        stored = {"matrix": matrix, "n_tokens": int(metadata["n_tokens"]), "n_texts": int(metadata["n_texts"]),
                  "corpus": metadata["corpus"]}
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        return None, f"unreadable file ({type(error).__name__}: {error})"
    if stored_key != key:
        differing = sorted(k for k in key.keys() | stored_key.keys() if key.get(k) != stored_key.get(k))
        return None, f"stored key differs in {differing}"
    if matrix.dtype != torch.float64 or tuple(matrix.shape) != (d_k, d_k):
        return None, f"matrix is {matrix.dtype} {tuple(matrix.shape)}, expected float64 ({d_k}, {d_k})"
    if not torch.isfinite(matrix).all():
        return None, "matrix has non-finite entries"
    if not torch.equal(matrix, matrix.T):
        return None, "matrix is not symmetric"
    return stored, None


def write_cache(path: Path, key: dict, matrix: torch.Tensor, n_tokens: int, n_texts: int, corpus: str) -> None:
    write_tensors_atomic(path, {"matrix": matrix}, metadata={
        "key": json.dumps(key, sort_keys=True), "n_tokens": str(n_tokens), "n_texts": str(n_texts), "corpus": corpus})


# ---------------------------------------------------------------- entry point

def layer_second_moment(model, tok, layer_module: str, *, corpus: str, dynamic: bool, dynamic_multiplier: float,
                        n_samples: int, model_id: str, model_revision: str, max_length: int | None = None,
                        batch_tokens: int = DEFAULT_BATCH_TOKENS, stats_dir: Path | None = None,
                        dtype: str = "float32", seed: int = 0, device=None) -> SecondMoment:
    """C0 for the edited matrix `layer_module`, from the disk cache when a valid file exists.

    dtype is the hparams' mom2_dtype. Keys are computed in the dtype the model is loaded in (an fp16 model
    with the reference files' "float32" must still work) and accumulated in float64; the cache key records
    the forward dtype actually used.
    """
    if dtype not in FORWARD_DTYPES:
        raise ValueError(f"mom2_dtype must be one of {sorted(FORWARD_DTYPES)}, got {dtype!r}")
    model_dtype = next(model.parameters()).dtype
    if model_dtype != FORWARD_DTYPES[dtype]:
        forward_dtype = str(model_dtype).removeprefix("torch.")
        log.info("mom2_dtype is %s but the model is loaded in %s: keys are computed in %s, accumulated in float64",
                 dtype, forward_dtype, forward_dtype)
        dtype = forward_dtype
    if model.training:
        raise ValueError("the model is in training mode (dropout would randomise the keys); call model.eval()")
    device = device if device is not None else next(model.parameters()).device
    d_k = key_dim(get_module(model, layer_module))
    max_length = max_length or default_max_length(model)
    if dynamic:
        sample = {"mode": "tokens", "n": round(dynamic_multiplier * d_k)}
        if sample["n"] < 1:
            raise ValueError(f"dynamic_multiplier {dynamic_multiplier} × d_k {d_k} gives no tokens")
    else:
        sample = {"mode": "articles", "n": int(n_samples)}
    stats_dir = Path(stats_dir) if stats_dir is not None else G.stats_dir()
    pool_articles = HUB_POOL_ARTICLES if dynamic else max(HUB_POOL_ARTICLES, sample["n"])
    sources = corpus_sources(corpus, pool_articles)

    def key_for(source):
        return cache_key(model_id=model_id, model_revision=model_revision, layer_module=layer_module,
                         source=source, sample=sample, max_length=max_length, seed=seed, dtype=dtype)

    problems = {}
    for source in sources:
        key = key_for(source)
        path = cache_path(stats_dir, key, source)
        stored, problem = read_cache(path, key, d_k)
        if stored is not None:
            log.info("C0 %s: cache hit %s", layer_module, path)
            return SecondMoment(stored["matrix"], stored["n_tokens"], stored["n_texts"], stored["corpus"], "hit", path)
        if problem is not None:
            log.warning("C0 %s: cache file %s is not usable (%s); recomputing", layer_module, path, problem)
            problems[path] = problem

    source, articles = load_articles(corpus, sources)
    key = key_for(source)
    path = cache_path(stats_dir, key, source)
    n_tokens = sample["n"] if dynamic else None
    texts = sample_token_ids(tok, articles, seed=seed, max_length=max_length, n_tokens=n_tokens,
                             n_articles=None if dynamic else sample["n"])
    pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0  # pads are masked: any id works
    matrix = accumulate_second_moment(model, layer_module, texts, pad_token_id=pad_token_id,
                                      batch_tokens=batch_tokens, device=device)
    n_counted = sum(len(ids) for ids in texts)
    write_cache(path, key, matrix, n_counted, len(texts), source.description)
    status = f"recomputed: {problems[path]}" if path in problems else "miss"
    log.info("C0 %s: %s; %d tokens of %d texts from %s -> %s", layer_module, status, n_counted, len(texts),
             source.description, path)
    return SecondMoment(matrix, n_counted, len(texts), source.description, status, path)
