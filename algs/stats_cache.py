"""The disk cache of C0 and the reference repos' published statistics.

One safetensors file per model, corpus and layer, keyed by everything that determines it (model id and
revision, layer module, corpus, sample size, max_length, seed, dtype); a corrupt or mismatched file is
recomputed, never silently used. The ROME/MEMIT repos' `.npz` statistics (runningstats SecondMoment state: raw
moment `mom2` and `count`) are read without pickle and cached here with their path, sha256 and count.
"""
import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from algs.stats_accumulate import key_dim, mean_from_total
from algs.stats_corpus import CorpusSource, sanitise
from util.arch import get_module
from util.errors import InputError
from util.io import file_sha256, write_tensors_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class SecondMoment:
    matrix: torch.Tensor  # (d_k, d_k) float64 on CPU: the mean of k kᵀ
    n_tokens: int
    n_texts: int
    corpus: str  # the corpus really used
    cache: str  # "hit", "miss" or "recomputed: <why>"
    cache_path: Path
    provenance: dict | None = None  # published statistics: {"path", "sha256", "count", "dtype"} of the .npz read



def cache_key(*, model_id, model_revision, layer_module, source: CorpusSource, sample: dict, max_length,
              seed, dtype) -> dict:
    return {"format_version": FORMAT_VERSION, "model_id": model_id, "model_revision": model_revision,
            "layer_module": layer_module, "corpus": source.key, "sample": sample, "max_length": max_length,
            "seed": seed, "dtype": dtype, "special_tokens": True}


def cache_path(stats_dir: Path, key: dict, source: CorpusSource) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    size = f"{key['sample']['mode']}{key['sample'].get('n', '')}"
    name = f"{sanitise(key['layer_module'])}_{key['dtype']}_{size}_{digest}.safetensors"
    return Path(stats_dir) / sanitise(key["model_id"]) / source.dir_name / name


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
                          dir_name=sanitise(f"published-{path.parent.name}"),
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

