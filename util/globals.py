"""Paths from globals.yml, each overridable by an environment variable (KE_<NAME>)."""
import os
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
_ENV_PREFIX = "KE_"


def _load() -> dict:
    with open(REPO_ROOT / "globals.yml") as f:
        return yaml.safe_load(f)


_CONFIG = _load()


def _path(name: str) -> Path:
    value = os.environ.get(_ENV_PREFIX + name) or _CONFIG[name]
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def results_dir() -> Path:
    return _path("RESULTS_DIR")


def data_dir() -> Path:
    return _path("DATA_DIR")


def stats_dir() -> Path:
    return _path("STATS_DIR")


def hparams_dir() -> Path:
    return _path("HPARAMS_DIR")


def kv_dir() -> Path:
    return _path("KV_DIR")


def models_dir() -> Path:
    return _path("MODELS_DIR")


def remote_root_url() -> str:
    return os.environ.get(_ENV_PREFIX + "REMOTE_ROOT_URL") or _CONFIG["REMOTE_ROOT_URL"]
