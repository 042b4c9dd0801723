"""The tiny CLI workspace the CLI tests share: a tiny saved GPT-2, six CounterFact facts, a local corpus and
hparams (the `ws` fixture in conftest.py builds it), and helpers that run the CLI and read its results."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import evaluate_unified_editing as cli
from util.globals import REPO_ROOT
from util.io import read_json
from util.models import load_model

N_LAYER = 4
D_MLP = 64  # d_k of GPT-2's mlp.c_proj
EDIT_LAYER = 1
REWRITE_MODULE = f"transformer.h.{EDIT_LAYER}.mlp.c_proj"
MULTIPLIER = 2  # FastMEMIT cap: C0 from exactly 2 x d_k tokens
N_CASES = 6
NUM_EDITS = 2
NLL_GROUPS = ("rewrite_prompts_nll", "paraphrase_prompts_nll", "neighborhood_prompts_nll")
CASE_KEYS = {"case_id", "batch", "batch_case_ids", "num_edits", "sequential", "requested_rewrite", "edit_time",
             "generation_test", "pre", "post", "edit"}
PARAMS_KEYS = {"alg_name", "model_name", "model_id", "model_revision", "hparams_fname", "hparams", "args", "seed",
               "ds_name", "dataset_source", "num_cases", "versions", "git_commit", "device", "dtype", "statistics",
               "started_at", "status", "finished_at", "total_seconds"}
FACTS = [  # subject, prompt, true, new
    ("Danielle Darrieux", "The mother tongue of {} is", "French", "English"),
    ("Edwin of Northumbria", "The official religion of {} is", "Christianity", "Islam"),
    ("Toko Yasuda", "{} plays the instrument", "guitar", "piano"),
    ("Autonomous University of Madrid", "{} is located in the country of", "Spain", "Sweden"),
    ("Thomas Joannes Stieltjes", "The mother tongue of {} is", "Dutch", "English"),
    ("Anaal Nathrakh", "{} was founded in", "Birmingham", "Philadelphia"),
]


def make_record(case_id, subject, prompt, true, new):
    return {
        "case_id": case_id,
        "requested_rewrite": {"prompt": prompt, "relation_id": "P1", "subject": subject,
                              "target_new": {"str": new, "id": f"Q{case_id}"},
                              "target_true": {"str": true, "id": "Q0"}},
        "paraphrase_prompts": [f"Some words. {prompt.format(subject)}", f"In short, {prompt.format(subject)}"],
        "neighborhood_prompts": [prompt.format("Someone else"), prompt.format("Another person")],
        "attribute_prompts": [prompt.format("A third person")],
        "generation_prompts": [f"{subject} is known for", f"People say that {subject}"],
    }


def write_hparams(path: Path, corpus: Path, **changes) -> Path:
    hparams = {"layers": [EDIT_LAYER], "v_num_grad_steps": 4, "v_lr": 0.5, "v_loss_layer": N_LAYER - 1,
               "v_weight_decay": 1e-3, "clamp_norm_factor": 4.0, "kl_factor": 0.0625,
               "context_template_length_params": [[3, 2]], "mom2_dataset": str(corpus), "mom2_n_samples": 10,
               "mom2_dtype": "float32", "mom2_update_weight": 100.0, "dynamic": True,
               "dynamic_multiplier": MULTIPLIER, "emmet_lambda": 0.1}
    hparams.update(changes)
    path.write_text(json.dumps({k: v for k, v in hparams.items() if v is not None}))
    return path


def argv_for(ws, results_dir, *extra, hparams=None, alg="EMMET"):
    return [f"--alg_name={alg}", f"--model_name={ws.model_dir}", f"--hparams_fname={hparams or ws.hparams}",
            "--ds_name=cf", f"--num_edits={NUM_EDITS}", f"--dataset_size_limit={N_CASES}",
            "--generation_test_interval=2", f"--data_dir={ws.data_dir}", f"--results_dir={results_dir}",
            f"--stats_dir={ws.stats_dir}", "--device=cpu", *extra]


def run_capturing_model(ws, results_dir, *extra, alg="EMMET", **options):
    """main() in-process; (exit status, the run dir, the model object as the CLI left it)."""
    loaded = []

    def capture(*args, **kwargs):
        loaded.append(load_model(*args, **kwargs))
        return loaded[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KE_NO_DOWNLOAD", "1")
        patch.setattr(cli, "load_model", capture)
        status = cli.main(argv_for(ws, results_dir, *extra, alg=alg, **options))
    runs = sorted((results_dir / alg).glob("run_*"))
    return status, runs[-1] if runs else None, loaded[0][0] if loaded else None


def read_cases(run_dir: Path) -> dict:
    return {case["case_id"]: case for case in map(read_json, sorted(run_dir.glob("case_*.json")))}


def nlls(metrics: dict) -> list:
    """Every target NLL of a case's metrics, flat (pytest.approx compares flat lists)."""
    return [pair[target] for group in NLL_GROUPS for pair in metrics[group] for target in ("target_new", "target_true")]


def wait_for(paths, process, log_path, timeout=180.0):
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        if process.poll() is not None:
            pytest.fail(f"the run ended (status {process.returncode}) before it could be killed:\n"
                        f"{log_path.read_text()[-3000:]}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {paths}")
        time.sleep(0.02)


def run_and_kill(argv, written, log_path, entry=("-m", "experiments.evaluate_unified_editing"), cwd=REPO_ROOT):
    """Start the CLI in a subprocess (one thread) and SIGKILL it as soon as every path in `written` exists."""
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([sys.executable, *entry, *argv], cwd=cwd, stdout=log_file, stderr=log_file,
                                   env={**os.environ, "KE_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1"})
        try:
            wait_for(written, process, log_path)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
