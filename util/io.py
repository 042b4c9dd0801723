"""Atomic JSON files and numbered run directories: a killed run never leaves a half-written file."""
import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save


@contextmanager
def atomic_path(path, suffix: str = ".tmp"):
    """Yield a temporary path beside `path`; once the block has written it, fsync it and rename it over `path`.

    A killed run leaves at most a hidden `.<name>.*<suffix>` file, never a half-written `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except OSError as error:  # name the file that could not be written, not the temporary one
        raise OSError(error.errno, error.strerror, str(path)) from None
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path, obj, indent: int = 1) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent))


def write_tensors_atomic(path, tensors: dict, metadata: dict | None = None) -> None:
    """Save tensors (moved to CPU) as safetensors, atomically. Serialized in memory and written through
    atomic_path: safetensors' save_file would write a hidden temporary file of its own, which a kill leaves."""
    data = save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, metadata=metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


SAFETENSORS_TEMP_GLOB = ".tmp*"  # what an interrupted safetensors save_file left (older runs of this code)


def remove_temp_leftovers(folder) -> None:
    """Remove the hidden temporary files a killed safetensors save_file left in `folder` (never read)."""
    for leftover in Path(folder).glob(SAFETENSORS_TEMP_GLOB):
        if leftover.is_file():
            leftover.unlink()


def file_sha256(path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (model and statistics files can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path):
    with open(path) as f:
        return json.load(f)


_RUN_RE = re.compile(r"^run_(\d{3,})$")


def run_ids(alg_dir) -> list:
    alg_dir = Path(alg_dir)
    if not alg_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in alg_dir.iterdir() if (m := _RUN_RE.match(p.name)))


def new_run_dir(alg_dir) -> Path:
    """Create results/<ALG>/run_XXX with the next free number (race-safe through mkdir)."""
    alg_dir = Path(alg_dir)
    alg_dir.mkdir(parents=True, exist_ok=True)
    next_id = (run_ids(alg_dir) or [-1])[-1] + 1
    while True:
        path = alg_dir / f"run_{next_id:03d}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            next_id += 1
