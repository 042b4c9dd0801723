"""Find a data file in the data directory, or fetch it once from the public root the ROME/MEMIT authors serve.

Every loader in dsets/ goes through `locate`, so a missing file always ends in the same `DatasetNotFound`
message: every place looked, the URL tried, and how to provide the file. Set KE_NO_DOWNLOAD=1 to forbid
network access (tests do); downloads use a short socket timeout because many machines here are offline.
"""
import json
import logging
import os
import shutil
import urllib.request
from pathlib import Path

from util import globals as G
from util.errors import InputError
from util.io import atomic_path, read_json

log = logging.getLogger(__name__)

REMOTE_DSETS = "data/dsets"  # folder under remote_root_url() holding the authors' data files
NO_DOWNLOAD_ENV = "KE_NO_DOWNLOAD"
DOWNLOAD_TIMEOUT_S = 5.0  # per socket operation (connect, each read)

_TRUE_WORDS = ("1", "true", "yes")
_FALSE_WORDS = ("", "0", "false", "no")


class DatasetNotFound(InputError, FileNotFoundError):
    """A data file is neither in the data directory nor downloadable; the message says how to provide it."""

    def __init__(self, what: str, looked: list, url: str | None, failure: str):
        self.looked = [str(p) for p in looked]
        self.url = url
        self.failure = failure
        InputError.__init__(self, f"{what} not found", ", ".join(self.looked),
                            f"{failure} Put the file in one of those places, or point the data directory at a folder "
                            f"that has it with --data_dir or the KE_DATA_DIR environment variable")

    def widened(self, what: str, more_places: list) -> "DatasetNotFound":
        """The same failure after also looking in `more_places` (fallback sources)."""
        return DatasetNotFound(what, self.looked + [str(p) for p in more_places], self.url, self.failure)


def resolve_data_dir(data_dir=None) -> Path:
    return Path(data_dir).expanduser() if data_dir is not None else G.data_dir()


def remote_url(remote_path: str) -> str:
    return f"{G.remote_root_url().rstrip('/')}/{remote_path.lstrip('/')}"


def downloads_allowed() -> bool:
    value = os.environ.get(NO_DOWNLOAD_ENV, "").strip().lower()
    if value in _TRUE_WORDS:
        return False
    if value in _FALSE_WORDS:
        return True
    raise ValueError(f"{NO_DOWNLOAD_ENV}={value!r}: expected one of {_TRUE_WORDS + _FALSE_WORDS[1:]} or unset")


def download_atomic(url: str, path: Path) -> None:
    """Stream `url` into a temporary file beside `path`, then rename it: never a half-written data file."""
    with atomic_path(path, suffix=".part") as tmp, open(tmp, "wb") as out, \
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        shutil.copyfileobj(response, out, length=1 << 20)


def read_json_file(path: Path):
    try:
        return read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"invalid JSON ({error})", str(path), "a partial copy? delete it and provide it again") \
            from None


def read_json_list(path: Path) -> list:
    data = read_json_file(path)
    if not isinstance(data, list):
        raise InputError(f"a JSON {type(data).__name__} instead of a list of records", str(path),
                         "give a JSON list of records")
    return data


def locate(name: str, data_dir=None, remote_path: str | None = None) -> Path:
    """`data_dir/name` if it exists; else download it from `remote_root_url()/remote_path` (if given and allowed)."""
    path = resolve_data_dir(data_dir) / name
    if path.is_file():
        return path
    if remote_path is None:
        raise DatasetNotFound(name, [path], None, "There is no public download for it.")
    url = remote_url(remote_path)
    if not downloads_allowed():
        raise DatasetNotFound(name, [path], url, f"Downloads are disabled ({NO_DOWNLOAD_ENV} is set), "
                                                 f"so {url} was not tried.")
    log.info("%s is missing; downloading %s", path, url)
    try:
        download_atomic(url, path)
    except OSError as error:
        raise DatasetNotFound(name, [path], url, f"Downloading {url} failed: {error}") from error
    return path
