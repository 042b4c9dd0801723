"""Editor: a model, its tokenizer, an algorithm, its hparams and the explicit EditState (SPEC §12).

    from algs import Editor
    ed = Editor.from_pretrained("smollm2-135m", alg="EMMET", hparams="smollm2-135m.json")
    report = ed.edit(prompts=["The mother tongue of Danielle Darrieux is"], target_new=["English"],
                     subject=["Danielle Darrieux"])
    ed.restore()                      # the unedited weights back, bit for bit; S_t and the edit list cleared

Edits accumulate (sequential by nature); `with ed.edited(requests) as report:` edits, lets you evaluate, and
puts the model and state back as they were before the block (a batched experiment). `save_state` /
`load_state` write and read exactly what a sequential run checkpoints: the edited matrices, S_t and the
edits. Evaluation lives in experiments.metrics (`evaluate(ed.model, ed.tokenizer, records)`).
"""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from algs import algorithm
from algs.distribute import EditOptions, apply_to_model, edited_modules, orig_weights, prepare_unedited, put_weights
from algs.requests import as_requests
from algs.state import EditState
from util import globals as G
from util.checks import check_hparams_fit
from util.errors import InputError
from util.io import write_json_atomic, write_tensors_atomic

STATE_PREFIX = "state::"  # checkpoint tensors of the edit state (S_t per matrix), beside the weights
EDITS_KEY = "edits"  # checkpoint metadata: the requests applied so far (JSON)


def hparams_path(alg_dir: str, name) -> Path:
    """`name` itself when it is a file, else <hparams dir>/<ALG>/<name>."""
    direct = Path(name).expanduser()
    if direct.is_file():
        return direct.resolve()
    in_dir = G.hparams_dir() / alg_dir / str(name)
    if in_dir.is_file():
        return in_dir.resolve()
    raise InputError(f"hparams file {str(name)!r} not found", f"{direct} and {in_dir}",
                     f"give a file name in {G.hparams_dir() / alg_dir} or a path to a JSON file")


def weight_norms(current: dict, initial: dict, previous: dict) -> dict:
    """Per matrix: ‖W_t‖_F, ‖W_t − W_0‖_F and ‖Δ_t‖_F = ‖W_t − W_{t−1}‖_F, in float64."""
    norms = {}
    for name, weight in current.items():
        w = weight.detach().double()
        norms[name] = {"weight_norm": w.norm().item(),
                       "distance_from_initial": (w - initial[name].to(w.device).double()).norm().item(),
                       "update_norm": (w - previous[name].to(w.device).double()).norm().item()}
    return norms


class Editor:
    """Edits one model with one algorithm; owns every piece of state the edits depend on."""

    def __init__(self, model, tokenizer, alg: str, hparams, *, seed: int = 0, stats_dir=None,
                 published_stats_dir=None, solve_device=None, target_cache_dir=None, prefix_cache: bool = True,
                 hparams_source: str | None = None):
        """hparams: a file name in hparams/<ALG>/, a path, a dict or an hparams object (hparams_source: where
        such an object came from, for messages).
        seed picks the context templates; stats_dir / published_stats_dir: where C0 is cached / read from;
        solve_device "cpu" keeps C0, its factors, the solve and the copies of W_0 off the GPU;
        target_cache_dir reuses target vectors of edits of the unedited model."""
        self.algorithm = algorithm(alg)
        self.model, self.tokenizer = model, tokenizer
        if isinstance(hparams, (str, Path)):
            self.hparams_source = str(hparams_path(self.algorithm.hparams_dir, hparams))
            self.hparams = self.algorithm.load_hparams(self.hparams_source)
        else:
            self.hparams_source = hparams_source
            self.hparams = self.algorithm.load_hparams(hparams)
        check_hparams_fit(model, self.hparams, self.hparams_source or f"the {alg} hparams")
        self.options = EditOptions(seed=seed, stats_dir=stats_dir, published_stats_dir=published_stats_dir,
                                   target_cache_dir=target_cache_dir, prefix_cache=prefix_cache,
                                   solve_device=solve_device)
        self.state = EditState()

    @classmethod
    def from_pretrained(cls, model_name: str, alg: str, hparams, *, device: str | None = None,
                        dtype: str = "float32", device_map=None, **options):
        """Load a model (hub id, local directory, or "smollm2-135m", the embedded model) and make its Editor."""
        from util.models import load_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tok = load_model(model_name, device, dtype, device_map=device_map)
        return cls(model, tok, alg, hparams, **options)

    @property
    def alg(self) -> str:
        return self.algorithm.name

    @property
    def edits(self) -> list:
        """The requests written into the model so far, in order."""
        return list(self.state.edits)

    def prepare(self) -> None:
        """Templates, C0 and the copies of W_0 from the model as it is now (it must be unedited). Edits do this
        on first use; call it to pay the statistics' cost up front."""
        prepare_unedited(self.model, self.tokenizer, self.hparams, self.state, self.options)

    def edit(self, requests=None, *, prompts=None, target_new=None, subject=None, ground_truth=None) -> dict:
        """Write one batch on top of the edits so far; the edit report (per solve: targets, layers, solver
        diagnostics, phase seconds; "weight_norms": ‖W_t‖, ‖W_t − W_0‖, ‖Δ_t‖ of every edited matrix).

        requests: framework dicts, dataset records, or (EasyEdit's form) prompts=[filled prompts],
        target_new=[...], subject=[...], ground_truth=[...] (optional)."""
        requests = as_requests(requests, prompts=prompts, target_new=target_new, subject=subject,
                               ground_truth=ground_truth, where=f"{self.alg} edit")
        self.prepare()
        before = self._matrices(on_solve_device=True)
        report = apply_to_model(self.model, self.tokenizer, requests, self.hparams,
                                lambda batch_size: self.algorithm.objective(self.hparams, batch_size),
                                self.state, self.options, self.algorithm.one_at_a_time)
        report["weight_norms"] = weight_norms(orig_weights(self.model, self.hparams), self.state.original_weights,
                                              before)
        return report

    def restore(self) -> None:
        """The unedited weights back (bit for bit); S_t and the list of edits cleared."""
        put_weights(self.model, self.state.original_weights)
        self.state.clear_edits()

    @contextmanager
    def edited(self, requests=None, **easyedit_form):
        """`with ed.edited(requests) as report:` the model holds these edits inside the block; afterwards it and
        the state are as before it (the unedited model, in a batched experiment)."""
        saved = self._snapshot()
        try:
            yield self.edit(requests, **easyedit_form)
        finally:
            self._put_back(saved)

    # ------------------------------------------------------------ saving

    def save_state(self, path, metadata: dict | None = None) -> None:
        """The edited matrices, S_t and the edits, atomically in one safetensors file (the sequential
        checkpoint); `metadata`: extra string fields (e.g. the last batch a run finished)."""
        tensors = {**orig_weights(self.model, self.hparams),
                   **{STATE_PREFIX + name: cov for name, cov in self.state.prev_keys_cov.items()}}
        write_tensors_atomic(path, tensors, {**(metadata or {}), EDITS_KEY: json.dumps(self.state.edits)})

    def load_state(self, path) -> dict:
        """Put a saved state into this editor; returns the file's metadata without the edits. The model first
        goes back to its W_0 (the weights this Editor first saw, from which templates and C0 are made), so the
        Editor must have been made on the unedited model, as for any edit."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError) as error:
            raise InputError(f"{path} is unreadable ({type(error).__name__}: {error})", "load_state",
                             "give a state file written by Editor.save_state (or start anew)") from None
        weights = {name: t for name, t in tensors.items() if not name.startswith(STATE_PREFIX)}
        expected = {name: weight.shape for name, weight in orig_weights(self.model, self.hparams).items()}
        if {name: weight.shape for name, weight in weights.items()} != expected:
            raise InputError(f"{path} holds {sorted(weights)}", "load_state",
                             f"give a state of the matrices this edit changes {sorted(expected)}")
        self.restore()
        self.prepare()
        put_weights(self.model, weights)
        self.state.prev_keys_cov = {name[len(STATE_PREFIX):]: t.to(torch.float64) for name, t in tensors.items()
                                    if name.startswith(STATE_PREFIX)}
        self.state.edits = json.loads(metadata.pop(EDITS_KEY, "[]"))
        return metadata

    def save_pretrained(self, path, extra: dict | None = None) -> None:
        """The edited model (save_pretrained, safetensors), its tokenizer and edits.json (the edits and
        `extra`), into a hidden temporary folder renamed into place: `path` is absent or complete. An existing
        complete `path` is kept."""
        path = Path(path)
        if (path / "edits.json").exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmpdir"))
        try:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / "edits.json", {"alg_name": self.alg, "edited_modules":
                                                   edited_modules(self.model, self.hparams),
                                                   "requested_rewrites": self.state.edits, **(extra or {})})
            if path.exists():  # a folder without edits.json: left by an older, interrupted save
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    # ------------------------------------------------------------ internals

    def _matrices(self, on_solve_device: bool = False) -> dict:
        """Copies of the edited matrices as they are now (on the CPU when the solves are)."""
        weights = orig_weights(self.model, self.hparams)
        if on_solve_device and self.options.solve_device is not None:
            weights = {name: w.to(self.options.solve_device) for name, w in weights.items()}
        return weights

    def _snapshot(self):
        return (self._matrices(on_solve_device=True), {name: cov.clone() for name, cov in
                                                       self.state.prev_keys_cov.items()}, list(self.state.edits))

    def _put_back(self, snapshot) -> None:
        weights, prev_keys_cov, edits = snapshot
        if not edits:  # back to the unedited model: the originals, bit for bit
            self.restore()
            return
        put_weights(self.model, weights)
        self.state.prev_keys_cov, self.state.edits = prev_keys_cov, edits
