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
import hashlib
import json
import logging
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from util import globals as G
from util.arch import get_module, is_conv1d
from util.errors import InputError
from util.tracing import StopForward, run_until
from util.io import file_sha256, write_tensors_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FALLBACK_MAX_LENGTH = 1024  # for a config that names no maximum positions
DEFAULT_BATCH_TOKENS = 4096
HUB_POOL_ARTICLES = 10_000
FORWARD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}
ACCUMULATE_DTYPES = {"float64": torch.float64, "float32": torch.float32}  # of each batch's k kᵀ; totals are float64
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
    provenance: dict | None = None  # published statistics: {"path", "sha256", "count", "dtype"} of the .npz read


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


def _padded(batch: list[list[int]], width: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `batch` right-padded to `width`: real tokens never see the pads."""
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def _forward_keys(model, layer_modules: list[str], input_ids, attention_mask, device) -> dict:
    """{module: its input at every non-pad token (model dtype, on device)} from one forward pass, which
    stops as soon as the last of `layer_modules` has run."""
    attention_mask = attention_mask.to(device)
    counted = attention_mask.bool()
    keys = {}

    def recorder(name):
        def record(module, args, output):
            keys[name] = args[0].detach()[counted]
            if len(keys) == len(layer_modules):
                raise StopForward()
        return record

    handles = [get_module(model, name).register_forward_hook(recorder(name)) for name in layer_modules]
    try:
        run_until(model, input_ids=input_ids.to(device), attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    not_run = [name for name in layer_modules if name not in keys]
    if not_run:
        raise RuntimeError(f"modules {not_run} did not run in the model's forward pass")
    return keys


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or another backend's RuntimeError saying so."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error))


def _batch_keys(model, layer_modules: list[str], batch: list[list[int]], *, pad_token_id: int, device,
                forward_tokens: int) -> tuple[dict, int]:
    """({module: keys of every token of `batch`}, the forward token budget to go on with).

    The batch runs in chunks of whole texts of at most `forward_tokens` padded tokens, each chunk padded to
    the batch's width (every text sees what it sees in one pass). On out-of-memory the budget is halved and
    the batch run again, down to one text per chunk; only then is the error raised.
    """
    width = max(len(ids) for ids in batch)
    input_ids, attention_mask = _padded(batch, width, pad_token_id)
    while True:
        rows = min(len(batch), max(1, forward_tokens // width))
        try:
            chunks = [_forward_keys(model, layer_modules, input_ids[start:start + rows],
                                    attention_mask[start:start + rows], device)
                      for start in range(0, len(batch), rows)]
            return {name: torch.cat([chunk[name] for chunk in chunks]) for name in layer_modules}, forward_tokens
        except RuntimeError as error:
            if rows == 1 or not is_out_of_memory(error):
                raise
        forward_tokens = rows * width // 2  # outside `except`: the failed chunk's tensors are freed first
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("C0: out of memory on %d texts × %d tokens per forward pass; retrying the batch with a "
                    "budget of %d tokens (%d texts per pass)", rows, width, forward_tokens,
                    max(1, forward_tokens // width))


def accumulate_key_products(model, layer_modules: list[str], texts: list[list[int]], *, pad_token_id: int,
                            batch_tokens: int, device, accumulate_dtype: torch.dtype = torch.float64) -> dict:
    """{module: Σ k kᵀ (float64, on device)} over every token of `texts`, k = the module's input, every
    module from the same forward passes.

    Each batch's k kᵀ is formed in accumulate_dtype (float32 is much faster on GPUs with slow float64)
    and added into the float64 total.
    """
    totals = {name: torch.zeros(d_k, d_k, dtype=torch.float64, device=device)
              for name, d_k in ((name, key_dim(get_module(model, name))) for name in layer_modules)}
    forward_tokens = batch_tokens
    n_tokens = sum(len(ids) for ids in texts)
    with torch.no_grad(), tqdm(total=n_tokens, desc=f"C0 {', '.join(layer_modules)}", unit="tok") as progress:
        for batch in _batches(texts, batch_tokens):
            keys, forward_tokens = _batch_keys(model, layer_modules, batch, pad_token_id=pad_token_id, device=device,
                                               forward_tokens=forward_tokens)
            for name, batch_keys in keys.items():
                batch_keys = batch_keys.to(accumulate_dtype)
                totals[name] += (batch_keys.T @ batch_keys).to(torch.float64)
            progress.update(sum(len(ids) for ids in batch))
    return totals


def mean_from_total(total: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Σ k kᵀ / n on CPU, made exactly symmetric (the cache check relies on it)."""
    mean = total.cpu() / n_tokens
    return (mean + mean.T) / 2


def key_dim(module) -> int:
    """d_k: the input width of W (Conv1D stores W as (d_in, d_out), nn.Linear as (d_out, d_in))."""
    return module.weight.shape[0] if is_conv1d(module) else module.in_features


def default_max_length(model) -> int:
    """The references' truncation: the model's maximum positions."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return positions or FALLBACK_MAX_LENGTH


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
    size = f"{key['sample']['mode']}{key['sample'].get('n', '')}"
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


# ---------------------------------------------------------------- published statistics (ROME/MEMIT .npz)

NPZ_PREFIXES = ("mom2.", "")  # a CombinedStat(mom2=SecondMoment()) state, or a SecondMoment saved alone
NPZ_FIX = ("give the .npz the reference's layer_stats wrote for this model and layer "
           "(<model>/<ds>_stats/<layer module>_<dtype>_mom2_<n>.npz: arrays mom2.mom2 and mom2.count)")


def find_published_file(root: Path, layer_module: str, model_id: str) -> Path:
    """The reference layout's file for `layer_module` under the folder `root`, or `root` itself when it is that
    file. Several matches are narrowed to the model's folder (`<model id with / as _>`); more is an error."""
    pattern = f"{layer_module}_*mom2*.npz"
    where = f"published_stats_dir {root}"
    if root.is_file():
        if root.match(pattern):
            return root
        raise InputError(f"the file is not named {pattern}", where,
                         "give the folder of the reference's statistics, or this layer's file")
    if not root.is_dir():
        raise InputError("no such file or folder", where, "give the reference repos' stats folder or one .npz of it")
    found = sorted(root.rglob(pattern))
    of_model = [path for path in found if model_id.replace("/", "_") in path.relative_to(root).parts]
    found = of_model or found
    if len(found) != 1:
        listed = ", ".join(str(path.relative_to(root)) for path in found) or "none"
        raise InputError(f"{len(found)} files match {pattern} ({listed})", where,
                         "give the folder (or the file) that holds exactly one such file per edited layer")
    return found[0]


def read_published_npz(path: Path, d_k: int) -> tuple[torch.Tensor, int, int]:
    """(mean of k kᵀ in float64, token count, sample size or 0) of a runningstats SecondMoment .npz.

    The file holds the raw moment Σ k kᵀ and the count; it is read without pickle and checked.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as error:  # numpy refuses pickled data without allow_pickle
        raise InputError(f"data numpy reads only with pickle ({error})", str(path), NPZ_FIX) from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"not a readable .npz file ({type(error).__name__}: {error})", str(path), NPZ_FIX) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError("a single array, not an .npz archive", str(path), NPZ_FIX)
    try:
        with archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as error:  # an object array inside the archive
        raise InputError(f"data numpy reads only with pickle ({error})", str(path), NPZ_FIX) from None
    prefix = next((p for p in NPZ_PREFIXES if f"{p}mom2" in arrays and f"{p}count" in arrays), None)
    if prefix is None:
        raise InputError(f"no mom2 and count arrays (it holds {sorted(arrays)})", str(path), NPZ_FIX)
    mom2, count = arrays[f"{prefix}mom2"], arrays[f"{prefix}count"]
    if mom2.dtype.kind != "f" or mom2.shape != (d_k, d_k):
        raise InputError(f"mom2 is {mom2.dtype} {mom2.shape}, expected a float ({d_k}, {d_k}) matrix (d_k of the "
                         "layer)", str(path), NPZ_FIX)
    if not np.isfinite(mom2).all():
        raise InputError("mom2 has non-finite entries", str(path), NPZ_FIX)
    if count.size != 1 or count.dtype.kind not in "iuf" or not float(count.item()).is_integer() or count.item() <= 0:
        raise InputError(f"count is {count.tolist()!r}, expected a positive whole number of tokens", str(path), NPZ_FIX)
    sample_size = arrays.get("sample_size")  # tally's argument; NaN-boxed when it was None
    n_texts = int(sample_size.item()) if (sample_size is not None and sample_size.size == 1
                                          and np.isfinite(sample_size.item())) else 0
    return mean_from_total(torch.from_numpy(mom2).to(torch.float64), int(count.item())), int(count.item()), n_texts


def published_second_moment(root: Path, model, layer_module: str, *, model_id: str, model_revision: str,
                            stats_dir: Path) -> SecondMoment:
    """C0 of `layer_module` from the reference repos' published statistics, cached in our format under a key
    naming the file's sha256; the provenance (path, sha256, count, dtype) comes back for params.json."""
    d_k = key_dim(get_module(model, layer_module))
    path = find_published_file(Path(root).expanduser().resolve(), layer_module, model_id)
    digest = file_sha256(path)
    precision = path.name[len(layer_module) + 1:].split("_mom2")[0]
    source = CorpusSource(description=f"published {path} (sha256 {digest})",
                          dir_name=_sanitise(f"published-{path.parent.name}"),
                          key={"kind": "published", "file": path.name, "sha256": digest})
    key = {"format_version": FORMAT_VERSION, "model_id": model_id, "model_revision": model_revision,
           "layer_module": layer_module, "corpus": source.key, "sample": {"mode": "published"}, "dtype": precision}
    target = cache_path(stats_dir, key, source)
    stored, problem = read_cache(target, key, d_k)
    if stored is not None:
        status = "hit"
    else:
        matrix, count, n_texts = read_published_npz(path, d_k)
        write_cache(target, key, matrix, count, n_texts, source.description)
        stored = {"matrix": matrix, "n_tokens": count, "n_texts": n_texts, "corpus": source.description}
        status = f"recomputed: {problem}" if problem else "miss"
    log.info("C0 %s: published statistics %s (%s) -> %s", layer_module, path, status, target)
    provenance = {"path": str(path), "sha256": digest, "count": stored["n_tokens"], "dtype": precision}
    return SecondMoment(stored["matrix"], stored["n_tokens"], stored["n_texts"], stored["corpus"], status, target,
                        provenance)


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


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed statistics need torch.distributed initialised (run under torchrun)")
    return dist.get_rank(), dist.get_world_size()


def _agreed(items: list, distributed: bool) -> list:
    """Rank 0's `items` on every rank (all ranks must run the same collective calls)."""
    if not distributed:
        return items
    holder = [items]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


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
