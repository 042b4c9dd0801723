"""Hostile and mistaken input, and faults, against the CLI, summarize, collect_stats and the Python API (issue #9).

Every bad input gets one line, `<prog>: error: <what> in <where>: <how to fix>`, and exit status 2 before any
work (the model is not even loaded where the check can run before it) and nothing is written; every fault
during a run (Ctrl-C, unwritable results, an error in the edit loop) leaves a resumable run whose params.json
says why it stopped."""
import copy
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from algs import get_algorithm
from algs.hparams import HparamsError
from experiments import evaluate_unified_editing as cli
from experiments import run_store, summarize
from experiments.metrics.counterfact import score_targets
from experiments.run_store import CHECKPOINT_FILE, PARAMS_FILE, RunStore
from tests.cli_workspace import N_LAYER, NUM_EDITS, argv_for, read_cases, wait_for, write_hparams
from tests.conftest import make_tiny_model
from tests.test_summarize import make_run
from util import io, tokens
from util.errors import InputError
from util.globals import REPO_ROOT
from util.io import read_json
from util.tokens import length_batches

pytestmark = pytest.mark.usefixtures("one_thread")


PREFIX = "evaluate_unified_editing: error: "
TWO_CASES = ("--dataset_size_limit=2", "--skip_generation_tests")


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    monkeypatch.setenv("KE_NO_DOWNLOAD", "1")


@pytest.fixture
def no_model_load(monkeypatch):
    """The check must run before the (slow) model load."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "load_model", refuse)


def one_error_line(err: str, prefix: str = PREFIX) -> str:
    """The single error line of stderr (progress bars aside), checked for the `<what> in <where>: <fix>` shape."""
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert " in " in lines[0] and ": " in lines[0][len(prefix):], err
    return lines[0]


def cli_error(capsys, argv, status: int = 2) -> str:
    assert cli.main(argv) == status
    return one_error_line(capsys.readouterr().err)


def nothing_written(results_dir: Path) -> bool:
    return not list(Path(results_dir).glob("*/run_*"))


def data_dir_with(tmp_path, ws, change=None, records=None) -> Path:
    """A data dir whose counterfact.json holds ws's records, the first one changed by `change`."""
    records = copy.deepcopy(ws.records) if records is None else records
    if change:
        change(records[0])
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "counterfact.json").write_text(json.dumps(records))
    return data_dir


def rewrite(key, value):
    def change(record):
        record["requested_rewrite"][key] = value
    return change


# ---------------------------------------------------------------- dataset records, before the model loads

RECORD_CASES = {
    "empty subject": (rewrite("subject", ""), ["subject is ''", "case_id 10", "non-empty subject"]),
    "blank subject": (rewrite("subject", "  "), ["subject is '  '", "case_id 10"]),
    "two placeholders": (rewrite("prompt", "{} and {} speak"), ["has 2 '{}'", "exactly one '{}'"]),
    "no placeholder": (rewrite("prompt", "The mother tongue is"), ["template containing '{}'", "record 0"]),
    "named field": (rewrite("prompt", "{} works for {company}"), ["braces besides", "remove them"]),
    "literal braces": (rewrite("prompt", "{} likes {{x}}"), ["braces besides"]),
    "empty target_new": (rewrite("target_new", {"str": ""}), ["target_new is {'str': ''}", "non-empty answer"]),
    "target_new missing str": (rewrite("target_new", {"id": "Q1"}), ["target_new.str missing"]),
    "empty target_true": (rewrite("target_true", {"str": " "}), ["target_true is"]),
    "target_new equals target_true": (rewrite("target_new", {"str": "French"}),
                                      ["target_new equals target_true ('French')", "differs"]),
}


@pytest.mark.parametrize("name", RECORD_CASES)
def test_bad_record_is_refused_before_the_model_loads(ws, tmp_path, capsys, no_model_load, name):
    change, expected = RECORD_CASES[name]
    data_dir = data_dir_with(tmp_path, ws, change)
    line = cli_error(capsys, argv_for(ws, tmp_path / "results", f"--data_dir={data_dir}"))
    assert str(data_dir / "counterfact.json") in line
    for text in expected:
        assert text in line
    assert nothing_written(tmp_path / "results")


def test_empty_dataset_is_an_error(ws, tmp_path, capsys, no_model_load):
    data_dir = data_dir_with(tmp_path, ws, records=[])
    line = cli_error(capsys, argv_for(ws, tmp_path / "results", f"--data_dir={data_dir}"))
    assert "no usable cf records" in line and "at least one usable record" in line
    assert nothing_written(tmp_path / "results")


def test_easyedit_set_with_no_usable_record_is_an_error(ws, tmp_path, capsys, no_model_load):
    folder = tmp_path / "data" / "counterfact_easyedit"
    folder.mkdir(parents=True)
    record = {"case_id": 0, "prompt": "The mother tongue of X is", "subject": "Danielle Darrieux",
              "target_new": "English", "ground_truth": "French", "rephrase_prompt": "r", "locality_prompt": "l"}
    for name in ("counterfact-edit.json", "counterfact-train.json", "counterfact-val.json"):
        (folder / name).write_text(json.dumps([{**record, "case_id": len(name)}]))
    line = cli_error(capsys, argv_for(ws, tmp_path / "results", f"--data_dir={tmp_path / 'data'}"))
    assert "no usable cf records (3 skipped: the subject is not in the prompt" in line
    assert nothing_written(tmp_path / "results")


# ---------------------------------------------------------------- hparams values, before the model loads

HPARAMS_CASES = {
    "mom2_update_weight 0": ({"mom2_update_weight": 0}, ["'mom2_update_weight' is 0", "above 0"]),
    "mom2_update_weight negative": ({"mom2_update_weight": -5.0}, ["'mom2_update_weight' is -5.0"]),
    "NaN learning rate": ({"v_lr": float("nan")}, ["'v_lr' is nan", "finite number"]),
    "infinite kl_factor": ({"kl_factor": float("inf")}, ["'kl_factor' is inf", "finite number"]),
    "v_num_grad_steps 0": ({"v_num_grad_steps": 0}, ["'v_num_grad_steps' is 0", "Adam steps"]),
    "negative weight decay": ({"v_weight_decay": -1.0}, ["'v_weight_decay' is -1.0", "at least 0"]),
    "template params not pairs": ({"context_template_length_params": [[5]]},
                                  ["'context_template_length_params' has the entry [5]", "[[n_tokens, n_templates]"]),
    "template params flat": ({"context_template_length_params": [5, 10]}, ["has the entry 5"]),
    "template params zero": ({"context_template_length_params": [[0, 5]]}, ["has the entry [0, 5]"]),
    "negative layer": ({"layers": [-1]}, ["negative layer"]),
    "layers as a string": ({"layers": "1"}, ["key 'layers' is '1'", "give a list"]),
    "unknown mom2_dtype": ({"mom2_dtype": "float8"}, ["'mom2_dtype' is 'float8'", "float32"]),
}


@pytest.mark.parametrize("name", HPARAMS_CASES)
def test_bad_hparams_value_is_refused_before_the_model_loads(ws, tmp_path, capsys, no_model_load, name):
    changes, expected = HPARAMS_CASES[name]
    hparams = tmp_path / "bad.json"
    write_hparams(hparams, ws.corpus)
    values = {**json.loads(hparams.read_text()), **changes}
    hparams.write_text(json.dumps(values))  # json writes NaN / Infinity, which Python's json reads back
    line = cli_error(capsys, argv_for(ws, tmp_path / "results", hparams=hparams))
    assert f"in {hparams}: " in line
    for text in expected:
        assert text in line
    assert nothing_written(tmp_path / "results")


def test_hparams_errors_of_the_python_api_are_input_errors():
    hparams_class, _ = get_algorithm("EMMET")
    valid = {"layers": [1], "v_num_grad_steps": 4, "v_lr": 0.5, "v_loss_layer": 3, "v_weight_decay": 1e-3,
             "clamp_norm_factor": 4.0, "kl_factor": 0.0625}
    with pytest.raises(HparamsError, match=r"'v_num_grad_steps' is 0 in EMMETHyperParams: give a number above 0"):
        hparams_class(**{**valid, "v_num_grad_steps": 0})
    with pytest.raises(InputError, match=r"'emmet_lambda' is -1 in <dict>: give a number of at least 0"):
        hparams_class.from_dict({**valid, "emmet_lambda": -1})
    assert issubclass(HparamsError, InputError) and issubclass(cli.UsageError, InputError)


# ---------------------------------------------------------------- flags, model names, corpora

@pytest.mark.parametrize("device,expected", [
    ("gpu0", "'gpu0' is not a torch device in --device: give cpu, cuda, cuda:N or mps"),
    ("cuda:99", "cuda:99"),
    ("meta", "device type 'meta' is not supported"),
])
def test_bad_device_is_refused(ws, tmp_path, capsys, no_model_load, device, expected):
    line = cli_error(capsys, argv_for(ws, tmp_path / "results", f"--device={device}"))
    assert expected in line
    assert nothing_written(tmp_path / "results")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(ws, tmp_path, capsys, no_model_load):
    line = cli_error(capsys, argv_for(ws, tmp_path / "results", "--device=cuda"))
    assert "CUDA is not available on this machine" in line and "use --device cpu" in line


def test_model_that_is_not_there_names_where_it_looked_and_the_offline_alternatives(ws, tmp_path, capsys,
                                                                                     monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: fail at once
    empty = tmp_path / "empty_model"
    empty.mkdir()
    cases = {f"--model_name={empty}": [f"no model named '{empty}' in the directory {empty} (it has no config.json)"],
             "--model_name=./no/such/dir": ["(no such directory)"],
             "--model_name=no-such-org/no-such-model": ["no model named 'no-such-org/no-such-model' could be loaded",
                                                        "the hub cache", "the Hugging Face hub"]}
    for flag, expected in cases.items():
        line = cli_error(capsys, argv_for(ws, tmp_path / "results", flag))
        for text in expected + ["'smollm2-135m' (the embedded model, needs no download)", "local model directory"]:
            assert text in line
    assert nothing_written(tmp_path / "results")


def test_corpus_that_is_not_utf8_is_named_before_the_model_loads(ws, tmp_path, capsys, no_model_load):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("A river flows past the mill.\n")
    (corpus / "latin1.txt").write_bytes("Caf\xe9 au lait, na\xefve r\xe9sum\xe9.\n".encode("latin-1"))
    line = cli_error(capsys, argv_for(ws, tmp_path / "results", f"--stats_corpus={corpus}"))
    assert f"in corpus file {corpus / 'latin1.txt'}: convert it to UTF-8" in line and "not UTF-8" in line


def test_missing_corpus_is_refused_before_the_model_loads(ws, tmp_path, capsys, no_model_load):
    line = cli_error(capsys, argv_for(ws, tmp_path / "results", f"--stats_corpus={tmp_path / 'nothing'}"))
    assert "statistics corpus" in line and "nothing" in line and "not found" in line


def test_layers_out_of_range_for_the_model(ws, tmp_path, capsys):
    hparams = write_hparams(tmp_path / "deep.json", ws.corpus, layers=[N_LAYER + 5])
    line = cli_error(capsys, argv_for(ws, tmp_path / "results", hparams=hparams))
    assert f"do not fit a model with {N_LAYER} layers in {hparams}" in line and f"below {N_LAYER}" in line
    assert nothing_written(tmp_path / "results")


# ---------------------------------------------------------------- resuming

def test_resume_after_the_dataset_changed_is_refused(ws, tmp_path, capsys, monkeypatch):
    data_dir = data_dir_with(tmp_path, ws)
    results = tmp_path / "results"
    argv = argv_for(ws, results, f"--data_dir={data_dir}", *TWO_CASES)
    assert cli.main(argv) == 0
    run_dir = results / "EMMET" / "run_000"
    params = read_json(run_dir / "params.json")
    assert len(params["dataset_fingerprint"]) == 16
    capsys.readouterr()
    data_dir_with(tmp_path, ws, rewrite("target_new", {"str": "German"}))
    before = (run_dir / "params.json").read_bytes()
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    line = cli_error(capsys, argv + ["--continue_from_run=run_000"])
    assert "the dataset's records changed since the run started" in line and str(run_dir / "params.json") in line
    assert "restore the dataset file" in line
    assert (run_dir / "params.json").read_bytes() == before


# Runs the CLI with its second batch's edit held until the test's SIGINT arrives: the signal lands at a point the
# run surely reaches (batch 0's files written, batch 1 being edited), however fast the machine is.
PAUSED_CLI = """
import sys, time
from pathlib import Path
from experiments import evaluate_unified_editing as cli
ready, edit_batch = Path(sys.argv[1]), cli.edit_batch
def held(run, requests):
    if run.store.batch_is_complete(0, [r["case_id"] for r in run.records[:len(requests)]]):
        ready.write_text("batch 1")
        time.sleep(300)  # SIGINT raises KeyboardInterrupt here
    return edit_batch(run, requests)
cli.edit_batch = held
sys.exit(cli.main(sys.argv[2:]))
"""


def test_ctrl_c_stops_between_writes_and_the_run_resumes(ws, tmp_path):
    results = tmp_path / "results"
    argv = argv_for(ws, results, "--dataset_size_limit=4", "--skip_generation_tests")
    run_dir = results / "EMMET" / "run_000"
    log_path, ready = tmp_path / "interrupted.log", tmp_path / "ready"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-c", PAUSED_CLI, str(ready), *argv], cwd=REPO_ROOT,
                                   stdout=subprocess.DEVNULL, stderr=log_file,
                                   env={**os.environ, "KE_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1"})
        try:
            wait_for([ready], process, log_path)
            process.send_signal(signal.SIGINT)
            status = process.wait(timeout=120)
        finally:
            process.kill()
            process.wait()
    err = log_path.read_text()
    assert status == cli.INTERRUPTED_STATUS, err
    errors = [line for line in err.splitlines() if line.startswith(PREFIX)]
    assert errors == [f"{PREFIX}interrupted (Ctrl-C) in {run_dir}: finished batches are kept; to go on, run the "
                      f"same command with --continue_from_run run_000"] and "Traceback" not in err
    params = read_json(run_dir / "params.json")
    assert params["status"] == "interrupted" and params["error"] == "interrupted (Ctrl-C)"
    assert len(list(run_dir.glob("case_*.json"))) == NUM_EDITS  # batch 0 whole, batch 1 not begun on disk
    (run_dir / ".tmpAbC123").write_bytes(b"\0" * 64)  # what a killed safetensors save_file used to leave
    assert cli.main(argv + ["--continue_from_run=run_000"]) == 0
    assert sorted(read_cases(run_dir)) == [r["case_id"] for r in ws.records[:4]]
    assert not list(run_dir.glob(".*tmp*"))
    params = read_json(run_dir / "params.json")
    assert params["status"] == "finished" and "error" not in params and "stopped_at" not in params


def test_results_that_become_unwritable_mid_run(ws, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    argv = argv_for(ws, results, "--dataset_size_limit=4", "--skip_generation_tests")
    run_dir = results / "EMMET" / "run_000"
    blocked = f"case_{ws.records[2]['case_id']}.json"  # batch 1
    write = run_store.write_json_atomic

    def write_until_blocked(path, obj, **kwargs):
        if Path(path).name == blocked:
            raise PermissionError(13, "Permission denied", str(path))
        write(path, obj, **kwargs)

    monkeypatch.setattr(run_store, "write_json_atomic", write_until_blocked)
    line = cli_error(capsys, argv)
    assert line == (f"{PREFIX}cannot write {run_dir / blocked} (Permission denied) in {run_dir}: finished batches "
                    f"are kept; to go on, run the same command with --continue_from_run run_000")
    assert read_json(run_dir / "params.json")["status"] == "failed"
    batch0 = {case_id: (run_dir / f"case_{case_id}.json").read_bytes() for case_id in (10, 11)}
    monkeypatch.setattr(run_store, "write_json_atomic", write)
    assert cli.main(argv + ["--continue_from_run=run_000"]) == 0
    assert sorted(read_cases(run_dir)) == [r["case_id"] for r in ws.records[:4]]
    assert all((run_dir / f"case_{case_id}.json").read_bytes() == data for case_id, data in batch0.items())


def test_an_error_in_the_edit_loop_is_a_message_and_a_resumable_run(ws, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    argv = argv_for(ws, results, "--dataset_size_limit=4", "--skip_generation_tests")
    run_dir = results / "EMMET" / "run_000"
    edit_batch, calls = cli.edit_batch, []

    def fail_second_batch(session, requests):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return edit_batch(session, requests)

    monkeypatch.setattr(cli, "edit_batch", fail_second_batch)
    line = cli_error(capsys, argv, status=cli.FAILED_STATUS)
    assert line.startswith(f"{PREFIX}RuntimeError: CUDA out of memory (simulated) in {run_dir}: ")
    assert "the traceback is in params.json" in line and "--continue_from_run run_000" in line
    params = read_json(run_dir / "params.json")
    assert params["status"] == "failed" and "fail_second_batch" in params["error_traceback"]
    assert len(read_cases(run_dir)) == NUM_EDITS


def test_a_killed_checkpoint_write_leaves_only_our_temporary_file(tmp_path):
    """safetensors' save_file wrote a hidden `.tmpXXXX` of its own, which resume never removed."""
    target = tmp_path / "run" / CHECKPOINT_FILE
    script = ("import os, signal, torch\nfrom util import io\n"
              "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
              f"io.write_tensors_atomic({str(target)!r}, {{'w': torch.ones(256, 256)}})\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, timeout=120)
    assert result.returncode == -signal.SIGKILL
    leftovers = [path.name for path in target.parent.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{CHECKPOINT_FILE}.") and leftovers[0].endswith(".tmp")
    (target.parent / PARAMS_FILE).write_text('{"args": {}}')
    RunStore.open_for_resume(target.parent.parent, target.parent.name).resume()  # what --continue_from_run does
    assert [path.name for path in target.parent.iterdir()] == [PARAMS_FILE]


def test_checkpoint_bytes_read_back(tmp_path):
    path = tmp_path / "weights.safetensors"
    io.write_tensors_atomic(path, {"a": torch.arange(6.0).view(2, 3)}, {"last_batch": "3"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["last_batch"] == "3" and torch.equal(f.get_tensor("a"), torch.arange(6.0).view(2, 3))
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


# ---------------------------------------------------------------- the Python API

@pytest.fixture(scope="module")
def api(embedded_tokenizer):
    hparams_class, apply = get_algorithm("EMMET")
    hp = hparams_class.from_dict({"layers": [1], "v_num_grad_steps": 2, "v_lr": 0.5, "v_loss_layer": N_LAYER - 1,
                                  "v_weight_decay": 1e-3, "clamp_norm_factor": 4.0, "kl_factor": 0.0625,
                                  "mom2_adjustment": False, "context_template_length_params": []})
    model = make_tiny_model("gpt2", embedded_tokenizer, n_layer=N_LAYER)
    request = {"case_id": 7, "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
               "target_new": {"str": "English"}, "target_true": {"str": "French"}}
    return model, embedded_tokenizer, hp, apply, request


@pytest.mark.parametrize("name,make_requests,expected", [
    ("a dict instead of a list", lambda r: r, "requests is a dict in apply_emmet_to_model: pass a list"),
    ("empty list", lambda r: [], "requests is empty in apply_emmet_to_model"),
    ("empty subject", lambda r: [{**r, "subject": ""}],
     "subject is '' in apply_emmet_to_model request 0 (case_id 7): give the non-empty subject"),
    ("two placeholders", lambda r: [{**r, "prompt": "{} and {}"}], "has 2 '{}' in apply_emmet_to_model request 0"),
    ("equal targets", lambda r: [{**r, "target_true": {"str": "English"}}], "target_new equals target_true"),
    ("string target", lambda r: [{**r, "target_new": "English"}], "target_new is 'English'"),
])
def test_python_api_raises_input_errors(api, name, make_requests, expected):
    model, tok, hp, apply, request = api
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError) as error:
        apply(model, tok, make_requests(request), hp)
    assert expected in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_python_api_layers_out_of_range(api):
    model, tok, hp, apply, request = api
    deep = copy.copy(hp)
    deep.layers = [N_LAYER + 3]
    with pytest.raises(InputError, match=rf"do not fit a model with {N_LAYER} layers in apply_emmet_to_model"):
        apply(model, tok, [request], deep)


def test_empty_subject_has_no_token_index(embedded_tokenizer):
    with pytest.raises(ValueError, match="subject '' is empty"):
        tokens.subject_token_index(embedded_tokenizer, "The mother tongue of {} is", "")


# ---------------------------------------------------------------- summarize

def test_summarize_output_to_a_directory_or_an_unwritable_folder(tmp_path, capsys):
    run_dir = make_run(tmp_path / "results")
    (tmp_path / "a_file").write_text("not a folder")
    cases = {("--csv", str(tmp_path)): f"{tmp_path} is a directory in --csv: give a file name",
             ("--plot", str(tmp_path / "a_file" / "out.png")): f"cannot write into {tmp_path / 'a_file'} in --plot",
             ("--json", str(tmp_path / "a_file" / "deeper" / "out.json")): "cannot write into"}
    for (flag, path), expected in cases.items():
        assert summarize.main([str(run_dir), flag, path]) == 2
        captured = capsys.readouterr()
        assert expected in one_error_line(captured.err, "summarize: error: ")
        assert captured.out == ""  # refused before any run was summarized
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "results"]


def test_summarize_output_that_fails_while_writing(tmp_path, capsys, monkeypatch):
    run_dir = make_run(tmp_path / "results")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out.csv"))

    monkeypatch.setattr(summarize, "write_csv", full_disk)
    assert summarize.main([str(run_dir), "--csv", str(tmp_path / "out.csv")]) == 2
    line = one_error_line(capsys.readouterr().err, "summarize: error: ")
    assert f"No space left on device in {tmp_path / 'out.csv'}" in line


# ---------------------------------------------------------------- collect_stats

@pytest.fixture(scope="module")
def collect_stats():
    spec = importlib.util.spec_from_file_location("collect_stats", REPO_ROOT / "scripts" / "collect_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STATS_HPARAMS = {"layers": [1], "mom2_dataset": "wikitext-103", "mom2_n_samples": 10, "mom2_dtype": "float32"}


@pytest.mark.parametrize("name,content,expected", [
    ("malformed JSON", '{"layers": [1],', "invalid JSON"),
    ("not an object", "[1, 2]", "a JSON list instead of an object"),
    ("layers as a string", json.dumps({**STATS_HPARAMS, "layers": "24"}), "key 'layers' is '24'"),
    ("negative samples", json.dumps({**STATS_HPARAMS, "mom2_n_samples": -3}), "key 'mom2_n_samples' is -3"),
    ("missing key", json.dumps({"layers": [1]}), "missing key(s) ['mom2_dataset', 'mom2_n_samples', 'mom2_dtype']"),
])
def test_collect_stats_refuses_bad_hparams_naming_the_file(collect_stats, tmp_path, capsys, monkeypatch,
                                                           name, content, expected):
    monkeypatch.setattr(collect_stats, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    path = tmp_path / "stats.json"
    path.write_text(content)
    assert collect_stats.main(["--model_name=gpt2", f"--hparams={path}"]) == 2
    line = one_error_line(capsys.readouterr().err, "collect_stats: error: ")
    assert expected in line and str(path) in line


def test_collect_stats_refuses_a_bad_corpus_or_device(collect_stats, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(collect_stats, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(STATS_HPARAMS))
    corpus = tmp_path / "cp1252.txt"
    corpus.write_bytes(b"smart \x93quotes\x94\n")
    assert collect_stats.main(["--model_name=gpt2", f"--hparams={path}", f"--corpus={corpus}"]) == 2
    assert f"in corpus file {corpus}" in one_error_line(capsys.readouterr().err, "collect_stats: error: ")
    assert collect_stats.main(["--model_name=gpt2", f"--hparams={path}", "--device=gpu0"]) == 2
    assert "'gpu0' is not a torch device" in one_error_line(capsys.readouterr().err, "collect_stats: error: ")


# ---------------------------------------------------------------- several checkouts

def test_scripts_import_the_code_beside_them_not_the_installed_checkout(tmp_path):
    clone = tmp_path / "second_checkout"
    for folder in ("algs", "dsets", "experiments", "util", "scripts"):
        shutil.copytree(REPO_ROOT / folder, clone / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "globals.yml", clone / "globals.yml")
    (clone / "util" / "__init__.py").write_text("import sys\nprint('SECOND CHECKOUT', file=sys.stderr)\n")
    for script in ("experiments/summarize.py", "experiments/evaluate_unified_editing.py", "scripts/collect_stats.py"):
        result = subprocess.run([sys.executable, str(clone / script), "--help"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr
        assert "SECOND CHECKOUT" in result.stderr, script


# ---------------------------------------------------------------- padding, deprecations

def test_a_long_prompt_is_padded_only_with_its_own_group():
    lengths = [12, 2400, 10, 11, 13, 9]
    batches = length_batches(lengths, batch_size=64, max_tokens=4096)
    assert batches == [[5, 2, 3, 0, 4], [1]]
    assert max(len(b) * max(lengths[i] for i in b) for b in batches) <= 4096
    assert length_batches([5] * 10, batch_size=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_grouped_scores_equal_one_pair_at_a_time(embedded_tokenizer):
    tok = embedded_tokenizer
    model = make_tiny_model("llama", tok)
    prefixes = ["The mother tongue of Danielle Darrieux is", " ".join(["The river flows past the mill."] * 8),
                "Toko Yasuda plays the", "Paris is the capital of"]
    targets = ["French", "English", "piano", "France"]
    grouped = score_targets(model, tok, prefixes, targets, batch_size=3)
    alone = [score_targets(model, tok, [p], [t])[0] for p, t in zip(prefixes, targets)]
    for a, b in zip(grouped, alone):
        assert a.correct == b.correct
        assert a.log_probs == pytest.approx(b.log_probs, rel=1e-5, abs=1e-6)


def test_deprecations_our_code_triggers_fail_the_tests(tmp_path, monkeypatch):
    """Libraries attribute their FutureWarnings to themselves; conftest's hook finds our caller on the stack."""
    (tmp_path / "fake_library.py").write_text(
        "import warnings\n\nclass Tokenizer:\n    @property\n    def pad_token_id(self):\n"
        "        warnings.warn('pad_token_id is deprecated', FutureWarning)\n        return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from fake_library import Tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with pytest.raises(FutureWarning, match="pad_token_id is deprecated"):
            tokens.pad_batch(Tokenizer(), [[1, 2], [3]])  # through util.tokens: an error
        with pytest.warns(FutureWarning):
            assert Tokenizer().pad_token_id == 0  # from the test itself: only recorded


def test_finite_check_covers_every_number():
    hparams_class, _ = get_algorithm("ROME")
    valid = {"layers": [1], "v_num_grad_steps": 4, "v_lr": 0.5, "v_loss_layer": 3, "v_weight_decay": 1e-3,
             "clamp_norm_factor": 4.0, "kl_factor": 0.0625}
    for key in ("v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "mom2_update_weight",
                "update_norm_lambda", "dynamic_multiplier"):
        with pytest.raises(HparamsError, match=f"'{key}' is nan"):
            hparams_class.from_dict({**valid, key: math.nan})
