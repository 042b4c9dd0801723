"""A run directory: params.json, one case file per case, the sequential checkpoint, the lifelong files.

    results/<ALG>/run_XXX/
      params.json                  hparams, arguments, provenance (model, data, statistics, versions), status
      case_<id>.json               pre / post (/ final) metrics of one case, its batch and the edit report
      edited_weights.safetensors   sequential checkpoint: Editor.save_state (edited matrices, S_t, edits)
      weight_norms.jsonl           one line per batch: ‖W_t‖, ‖W_t − W_0‖, ‖Δ_t‖ per edited matrix
      retention_<N>edits.json, downstream_<N>edits.json, edited_model_<N>edits/   (experiments.lifelong)

Every file is written atomically; a resumed run (`--continue_from_run`) finds here what is done, and refuses
to continue with settings or records that differ from the run's.
"""
import hashlib
import json
import logging
import platform
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

from util import globals as G
from util.errors import UsageError
from util.io import atomic_path, new_run_dir, read_json, remove_temp_leftovers, write_json_atomic

log = logging.getLogger(__name__)

PARAMS_FILE = "params.json"
CHECKPOINT_FILE = "edited_weights.safetensors"
WEIGHT_NORMS_FILE = "weight_norms.jsonl"
STOP_KEYS = ("stopped_at", "error", "error_traceback")  # why the last session stopped; cleared on resume


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict:
    import nltk
    import numpy
    import sklearn
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "nltk": nltk.__version__, "sklearn": sklearn.__version__}


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=G.REPO_ROOT, capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def as_json(obj):
    """The value as it reads back from a JSON file (for comparing stored and new params)."""
    return json.loads(json.dumps(obj))


def dataset_fingerprint(records) -> str:
    """Hash of the records a run edits, in order: a resumed run must edit the same ones."""
    return hashlib.sha256(json.dumps(list(records), sort_keys=True).encode()).hexdigest()[:16]


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class RunStore:
    """The files of one run directory."""

    def __init__(self, run_dir: Path, params: dict | None = None):
        self.run_dir = Path(run_dir)
        self.params = params or {}

    # ------------------------------------------------------------ creating and resuming

    @classmethod
    def create(cls, alg_dir: Path, params: dict) -> "RunStore":
        """A new run_XXX under alg_dir with params.json written."""
        store = cls(new_run_dir(alg_dir), params)
        store.write_params()
        return store

    @classmethod
    def open_for_resume(cls, alg_dir: Path, name: str) -> "RunStore":
        """The run `name` (--continue_from_run) and its stored params.json."""
        run_dir = Path(alg_dir) / name
        try:
            stored = read_json(run_dir / PARAMS_FILE)
        except FileNotFoundError:
            raise UsageError(f"--continue_from_run {name}: {run_dir / PARAMS_FILE} does not exist") from None
        except ValueError as error:
            raise UsageError(f"{run_dir / PARAMS_FILE} is not valid JSON ({error}); cannot continue that run") from None
        if not isinstance(stored, dict) or not isinstance(stored.get("args"), dict):
            raise UsageError(f"{run_dir / PARAMS_FILE} is not a params file of this CLI (no 'args'); cannot continue it")
        return cls(run_dir, stored)

    def check_same(self, now: dict, stored: dict | None = None, defaults: dict | None = None) -> None:
        """Refuse to continue a run whose stored settings differ from this invocation's in any key of `now`
        (a key the run predates counts as its default)."""
        stored = self.params if stored is None else stored
        defaults = defaults or {}

        def value(key):
            return stored[key] if key in stored or key not in defaults else defaults[key]

        differing = [key for key in now if as_json(value(key)) != as_json(now[key])]
        if differing:
            details = "; ".join(f"{key}: the run has {value(key)!r}, now {now[key]!r}" for key in differing)
            raise UsageError(f"settings differ from the run's ({details})", str(self.run_dir / PARAMS_FILE),
                             "repeat the run's flags and hparams, or start a new run without --continue_from_run")

    def check_same_records(self, fingerprint: str) -> None:
        """Refuse to continue a run whose records changed (old and new cases would be mixed in one run)."""
        stored = self.params.get("dataset_fingerprint")
        if stored is None:
            log.warning("%s predates dataset fingerprints: cannot check that its records are unchanged", self.run_dir)
        elif stored != fingerprint:
            raise UsageError(f"the dataset's records changed since the run started (fingerprint {stored}, now "
                             f"{fingerprint})", str(self.run_dir / PARAMS_FILE),
                             "restore the dataset file the run used, or start a new run without --continue_from_run")

    def resume(self) -> None:
        """Mark the run as running again and remove half-written files of the killed session (never read)."""
        self.params = {**{key: value for key, value in self.params.items() if key not in STOP_KEYS},
                       "status": "running", "resumed_at": self.params.get("resumed_at", []) + [utc_now()]}
        for leftover in self.run_dir.glob(".*.tmp*"):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        remove_temp_leftovers(self.run_dir)
        self.write_params()

    # ------------------------------------------------------------ params.json

    def write_params(self) -> None:
        write_json_atomic(self.run_dir / PARAMS_FILE, self.params)

    def record_stop(self, status: str, what: str, details: str | None = None) -> None:
        """Why the run stopped before its end, in params.json (when it can still be written)."""
        self.params.update(status=status, stopped_at=utc_now(), error=what,
                           **({"error_traceback": details} if details else {}))
        try:
            self.write_params()
        except OSError as error:
            log.warning("could not record the stop in %s: %s", self.run_dir / PARAMS_FILE, error)

    # ------------------------------------------------------------ case files

    def case_path(self, case_id) -> Path:
        return self.run_dir / f"case_{case_id}.json"

    def read_case(self, case_id) -> dict:
        return read_json(self.case_path(case_id))

    def write_case(self, case: dict) -> None:
        write_json_atomic(self.case_path(case["case_id"]), case)

    def batch_is_complete(self, batch: int, case_ids: list) -> bool:
        """Every case file of the batch exists, parses, and belongs to this batch with pre and post results."""
        for case_id in case_ids:
            try:
                case = self.read_case(case_id)
            except (OSError, ValueError):
                return False
            if (not isinstance(case, dict) or case.get("case_id") != case_id or case.get("batch") != batch
                    or case.get("batch_case_ids") != case_ids or "pre" not in case or "post" not in case):
                return False
        return True

    # ------------------------------------------------------------ sequential files

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_FILE

    def record_weight_norms(self, line: dict) -> None:
        """Put `line` (with its "batch") into weight_norms.jsonl, replacing an earlier line of the same batch
        (a redone batch after a resume); the file is rewritten atomically, sorted by batch."""
        path = self.run_dir / WEIGHT_NORMS_FILE
        lines = [entry for entry in read_jsonl(path) if entry.get("batch") != line["batch"]] + [line]
        lines.sort(key=lambda entry: entry["batch"])
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(entry) + "\n" for entry in lines))

    def checkpoint_file(self, kind: str, edits_done: int) -> Path:
        """retention_<N>edits.json / downstream_<N>edits.json."""
        return self.run_dir / f"{kind}_{edits_done}edits.json"

    def read_checkpoint(self, kind: str, edits_done: int):
        """A checkpoint file's object, or None when absent or unreadable (then it is recomputed)."""
        try:
            obj = read_json(self.checkpoint_file(kind, edits_done))
        except (OSError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None

    def write_checkpoint(self, kind: str, edits_done: int, obj: dict) -> None:
        write_json_atomic(self.checkpoint_file(kind, edits_done), obj)

    def model_dir(self, edits_done: int) -> Path:
        return self.run_dir / f"edited_model_{edits_done}edits"
