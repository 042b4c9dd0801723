"""The evaluation CLI end to end on a tiny GPT-2: results format, batched vs sequential, resume after a real
kill, boolean flags and clear errors for bad input."""
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from experiments import evaluate_unified_editing as cli
from experiments.metrics.counterfact import counterfact_case_metrics
from experiments.run_store import CHECKPOINT_FILE
from tests.cli_workspace import (CASE_KEYS, D_MLP, EDIT_LAYER, MULTIPLIER, N_CASES, NUM_EDITS, PARAMS_KEYS,
                                 REWRITE_MODULE, argv_for, nlls, read_cases, run_and_kill, run_capturing_model,
                                 write_hparams)
from util.globals import REPO_ROOT
from util.io import read_json
from util.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    monkeypatch.setenv("KE_NO_DOWNLOAD", "1")


@pytest.fixture(scope="module")
def batched_run(ws):
    status, run_dir, model = run_capturing_model(ws, ws.root / "results_batched", "--sequential=False")
    assert status == 0
    return SimpleNamespace(run_dir=run_dir, model=model)


@pytest.fixture(scope="module")
def sequential_run(ws):
    status, run_dir, model = run_capturing_model(ws, ws.root / "results_sequential", "--sequential")
    assert status == 0
    return SimpleNamespace(run_dir=run_dir, model=model)


def unedited_metrics(ws, case_index: int) -> dict:
    model, tok = load_model(str(ws.model_dir))
    return counterfact_case_metrics(model, tok, ws.records[case_index])


# ---------------------------------------------------------------- flags

def test_boolean_flags_parse_words_and_reject_others():
    base = ["--alg_name=ROME", "--model_name=m", "--hparams_fname=h.json", "--ds_name=cf"]
    assert cli.parse_args(base)[0].sequential is False
    assert cli.parse_args(base + ["--sequential"])[0].sequential is True
    assert cli.parse_args(base + ["--sequential=False"])[0].sequential is False
    assert cli.parse_args(base + ["--sequential=yes"])[0].sequential is True
    assert cli.parse_args(base + ["--sequential", "0"])[0].sequential is False
    assert cli.parse_args(base + ["--use_cache=TRUE", "--conserve_memory=no"])[0].use_cache is True
    for bad in (["--sequential=maybe"], ["--skip_generation_tests=2"], ["--ds_name=counterfact"], ["--num_edits=0"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.parse_args(base + bad)
        assert exit_info.value.code == 2


# ---------------------------------------------------------------- results format, batched vs sequential

def test_batched_run_writes_the_results_format(ws, batched_run):
    params = read_json(batched_run.run_dir / "params.json")
    assert PARAMS_KEYS <= params.keys()
    assert params["status"] == "finished" and params["num_cases"] == N_CASES and params["args"]["sequential"] is False
    assert params["hparams"]["layers"] == [EDIT_LAYER] and params["hparams_fname"] == str(ws.hparams)
    assert params["statistics"][REWRITE_MODULE]["n_tokens"] == MULTIPLIER * D_MLP
    assert str(ws.corpus) in params["statistics"][REWRITE_MODULE]["corpus"]
    assert "reference_score_skipped" in params["generation"]  # no snippets / tf-idf in the data dir
    cases = read_cases(batched_run.run_dir)
    assert sorted(cases) == [r["case_id"] for r in ws.records]
    for index, record in enumerate(ws.records):
        case = cases[record["case_id"]]
        assert set(case) == CASE_KEYS
        assert case["batch"] == index // NUM_EDITS
        assert case["batch_case_ids"] == [r["case_id"] for r in ws.records[index - index % NUM_EDITS:][:NUM_EDITS]]
        assert type(case["edit_time"]) is float and case["edit_time"] > 0
        assert case["requested_rewrite"] == record["requested_rewrite"]
        assert case["edit"]["layers"][0]["module"] == REWRITE_MODULE and "updates" in case["edit"]["target_optimisation"]
        assert ("generation" in case["pre"]) == ("generation" in case["post"]) == (index % 2 == 0)
        assert nlls(case["post"]) != nlls(case["pre"])  # the edit was in the model when "post" was measured


def test_batched_mode_restores_the_weights_after_each_batch(ws, batched_run):
    cases = read_cases(batched_run.run_dir)
    for index in (NUM_EDITS, N_CASES - 1):  # cases of later batches: evaluated on the unedited model
        assert nlls(cases[ws.records[index]["case_id"]]["pre"]) == pytest.approx(nlls(unedited_metrics(ws, index)))
    original, _ = load_model(str(ws.model_dir))
    final = batched_run.model.state_dict()
    assert all(torch.equal(final[name], weight) for name, weight in original.state_dict().items())


def test_sequential_mode_keeps_every_edit(ws, sequential_run):
    cases = read_cases(sequential_run.run_dir)
    assert {case["sequential"] for case in cases.values()} == {True}
    first = ws.records[0]["case_id"]
    assert nlls(cases[first]["pre"]) == pytest.approx(nlls(unedited_metrics(ws, 0)))
    later = cases[ws.records[NUM_EDITS]["case_id"]]["pre"]["rewrite_prompts_nll"][0]["target_new"]
    assert later != pytest.approx(unedited_metrics(ws, NUM_EDITS)["rewrite_prompts_nll"][0]["target_new"], rel=1e-6)
    original = load_model(str(ws.model_dir))[0].state_dict()
    final = sequential_run.model.state_dict()
    changed = {name for name, weight in original.items() if not torch.equal(final[name], weight)}
    assert changed == {f"{REWRITE_MODULE}.weight"}
    with safe_open(str(sequential_run.run_dir / CHECKPOINT_FILE), framework="pt") as f:
        assert f.metadata()["last_batch"] == str(N_CASES // NUM_EDITS - 1)
        assert torch.equal(f.get_tensor(REWRITE_MODULE), final[f"{REWRITE_MODULE}.weight"])


def test_rome_reports_each_cases_own_edit_and_negative_interval_means_never(ws, tmp_path):
    hparams = write_hparams(tmp_path / "rome.json", ws.corpus, emmet_lambda=None)
    status, run_dir, _ = run_capturing_model(ws, tmp_path / "results", "--dataset_size_limit=2",
                                             "--generation_test_interval=-1", hparams=hparams, alg="ROME")
    assert status == 0
    cases = list(read_cases(run_dir).values())
    assert len(cases) == 2 and cases[0]["batch_case_ids"] == cases[1]["batch_case_ids"]
    # ROME writes each fact by its own rank-one edit: each case file holds its own solve.
    assert cases[0]["edit"]["layers"][0]["solver"] != cases[1]["edit"]["layers"][0]["solver"]
    assert all("generation" not in case["pre"] and case["generation_test"].startswith("skipped") for case in cases)
    assert read_json(run_dir / "params.json")["generation"]["run"] is False


def test_use_cache_reuses_targets_in_batched_mode_only(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("KE_KV_DIR", str(tmp_path / "kvs"))
    two_cases = ("--dataset_size_limit=2", "--skip_generation_tests", "--use_cache")
    assert cli.main(argv_for(ws, tmp_path / "sequential", *two_cases, "--sequential")) == 0
    assert not (tmp_path / "kvs").exists()  # ignored: sequential targets depend on the earlier edits
    runs = []
    for name in ("first", "second"):
        assert cli.main(argv_for(ws, tmp_path / name, *two_cases)) == 0
        runs.append(read_cases(tmp_path / name / "EMMET" / "run_000"))
        assert len(list((tmp_path / "kvs").rglob("*.safetensors"))) == 2  # one per request, reused the 2nd time
    for case_id, case in runs[0].items():
        assert "cache" not in case["edit"]["target_optimisation"]
        assert runs[1][case_id]["edit"]["target_optimisation"]["cache"] == "hit"
        assert nlls(runs[1][case_id]["post"]) == pytest.approx(nlls(case["post"]))


# ---------------------------------------------------------------- resume after a real kill

@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_killed_run_continues_with_every_case_exactly_once(ws, tmp_path, mode, request):
    uninterrupted = request.getfixturevalue(f"{mode}_run")
    sequential = mode == "sequential"
    argv = argv_for(ws, tmp_path / "results", f"--sequential={sequential}")
    # Both ways of starting the CLI; one thread, as in this process (see one_thread).
    entry = ["-m", "experiments.evaluate_unified_editing"] if sequential else [
        str(REPO_ROOT / "experiments" / "evaluate_unified_editing.py")]
    run_dir = tmp_path / "results" / "EMMET" / "run_000"
    ids = [r["case_id"] for r in ws.records]
    # Batched: kill once batches 0 and 1 are written; sequential: once batch 0's checkpoint is written.
    written = [run_dir / CHECKPOINT_FILE] if sequential else [run_dir / f"case_{i}.json" for i in ids[:4]]
    run_and_kill(argv, written, tmp_path / "killed_run.log", entry, cwd=tmp_path)
    assert read_json(run_dir / "params.json")["status"] == "running"
    assert len(list(run_dir.glob("case_*.json"))) < N_CASES  # the kill really interrupted the run

    if not sequential:  # a half-done batch: one of batch 1's files broken, batch 0 intact
        (run_dir / f"case_{ids[3]}.json").write_text('{"case_id": ')
        batch0_stamps = [(run_dir / f"case_{i}.json").stat().st_mtime_ns for i in ids[:2]]
    assert cli.main(argv + ["--continue_from_run=run_000"]) == 0

    assert sorted(p.name for p in run_dir.glob("case_*.json")) == sorted(f"case_{i}.json" for i in ids)
    assert not list(run_dir.glob(".*.tmp"))
    params = read_json(run_dir / "params.json")
    assert params["status"] == "finished" and len(params["resumed_at"]) == 1
    if not sequential:
        assert [(run_dir / f"case_{i}.json").stat().st_mtime_ns for i in ids[:2]] == batch0_stamps
    resumed, reference = read_cases(run_dir), read_cases(uninterrupted.run_dir)
    for case_id in ids:  # the continued run ends where the uninterrupted one did
        assert resumed[case_id]["batch"] == reference[case_id]["batch"]
        for when in ("pre", "post"):
            assert nlls(resumed[case_id][when]) == pytest.approx(nlls(reference[case_id][when]), rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------- refused input

def test_resume_with_changed_settings_is_refused(ws, batched_run, tmp_path, capsys):
    results_dir = batched_run.run_dir.parent.parent
    run = f"--continue_from_run={batched_run.run_dir.name}"
    before = (batched_run.run_dir / "params.json").read_bytes()
    assert cli.main(argv_for(ws, results_dir, "--num_edits=3", run)) == 2
    assert "num_edits" in capsys.readouterr().err
    changed = write_hparams(tmp_path / "other.json", ws.corpus, v_lr=0.1)
    assert cli.main(argv_for(ws, results_dir, run, hparams=changed)) == 2
    assert "hparams" in capsys.readouterr().err
    assert cli.main(argv_for(ws, results_dir, "--continue_from_run=run_999")) == 2
    assert "run_999" in capsys.readouterr().err
    assert (batched_run.run_dir / "params.json").read_bytes() == before


def test_hparams_typo_gives_one_line_error_and_status_2(ws, tmp_path, capsys):
    hparams = write_hparams(tmp_path / "typo.json", ws.corpus, v_num_grad_steps=None, v_num_grad_step=3)
    assert cli.main(argv_for(ws, tmp_path / "results", hparams=hparams)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "v_num_grad_step" in err and "typo.json" in err
    assert not (tmp_path / "results").exists()


def test_missing_statistics_corpus_fails_before_any_evaluation(ws, tmp_path, capsys):
    hparams = write_hparams(tmp_path / "hp.json", tmp_path / "no_such_corpus")
    assert cli.main(argv_for(ws, tmp_path / "results", hparams=hparams)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("evaluate_unified_editing: error:")]
    assert len(errors) == 1 and "no_such_corpus" in errors[0] and "Traceback" not in err
    assert not list((tmp_path / "results").glob("*/run_*/case_*.json"))
