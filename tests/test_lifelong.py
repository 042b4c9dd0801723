"""Sequential (lifelong) runs end to end on a tiny GPT-2: final retention scores, the forgetting curve,
model-health checkpoints, matrix norms, saved models, and a SIGKILL + resume that leaves every case and
every checkpoint file exactly once."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from algs.editor import weight_norms
from experiments import evaluate_unified_editing as cli
from experiments import summarize
from experiments.metrics import Evaluation
from experiments.metrics.counterfact import counterfact_case_metrics, counterfact_case_scores
from experiments.run_store import WEIGHT_NORMS_FILE, read_jsonl
from tests.cli_workspace import (N_CASES, NUM_EDITS, REWRITE_MODULE, argv_for, nlls, read_cases, run_and_kill,
                                 run_capturing_model)
from util.io import read_json
from util.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


HEALTH = ("--do_downstream_eval", "--downstream_eval_steps=4", "--downstream_tasks=sst2,mmlu",
          "--number_of_few_shots=1", "--number_of_tests=3")
SEQUENTIAL = ("--sequential", "--skip_generation_tests", "--retention_eval_steps=4", *HEALTH)


def write_tiny_downstream(data_dir: Path) -> None:
    """A downstream/ folder in the reference layout (two tasks, a handful of rows) and a perplexity text."""
    root = data_dir / "downstream"
    (root / "sst2").mkdir(parents=True, exist_ok=True)
    (root / "mmlu" / "val").mkdir(parents=True, exist_ok=True)
    (root / "editing_subsets").mkdir(exist_ok=True)
    reviews = [("a charming and moving film .", 1), ("dull , flat and lifeless .", 0), ("a joy to watch .", 1),
               ("the worst script of the year .", 0), ("warm , funny and wise .", 1), ("tedious .", 0)]
    (root / "sst2" / "dev.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in reviews))
    questions = [{"subject": "astronomy", "input": "The following are multiple choice questions (with answers) about "
                  f" astronomy.\n\nQuestion {i}?\nA. one\nB. two\nC. three\nD. four\nAnswer:", "output": "ABCD"[i % 4]}
                 for i in range(5)]
    (root / "mmlu" / "val" / "zero_shot_mmlu_val.json").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "editing_subsets" / "subset_membership.json").write_text(json.dumps({
        "ume_sst2": {"n": 6, "target_rows_in_pickle_order": [1, 0, 2, 3, 4, 5]},
        "ume_mmlu(=MMLU validation, balanced)": {"n": 5, "target_rows_in_pickle_order": [4, 3, 2, 1, 0]}}))
    (data_dir / "wikitext-2-raw").mkdir(exist_ok=True)
    (data_dir / "wikitext-2-raw" / "wiki.test.raw").write_text(
        " = Valkyria Chronicles = \n\n" + " ".join(f"The game was released in {1990 + i} and sold well ." for i in range(300)))


@pytest.fixture(scope="module")
def lifelong_run(ws):
    write_tiny_downstream(ws.data_dir)
    status, run_dir, model = run_capturing_model(ws, ws.root / "results_lifelong", *SEQUENTIAL, "--save_model")
    assert status == 0
    return run_dir, model


def test_final_scores_are_the_cases_on_the_last_model(ws, lifelong_run):
    run_dir, model = lifelong_run
    cases = read_cases(run_dir)
    tok = load_model(str(ws.model_dir))[1]
    for record in ws.records:
        case = cases[record["case_id"]]
        assert case["final_after_batch"] == N_CASES // NUM_EDITS - 1 and case["final_num_edits_done"] == N_CASES
        assert nlls(case["final"]) == pytest.approx(nlls(counterfact_case_metrics(model, tok, record)), rel=1e-5)
    last = ws.records[-1]["case_id"]  # the last batch's post is measured on the final model too
    assert nlls(cases[last]["final"]) == pytest.approx(nlls(cases[last]["post"]), rel=1e-5)


def test_last_retention_checkpoint_reuses_the_final_scores(ws, tmp_path, monkeypatch):
    """After the last batch the cases are scored once: the retention checkpoint then is the final scores."""
    scored = []
    metrics = Evaluation.metrics

    def counting(self, model, tok, records, pre=None):
        scored.append(len(records))
        return metrics(self, model, tok, records, pre)

    monkeypatch.setattr(Evaluation, "metrics", counting)
    argv = argv_for(ws, tmp_path / "results", "--sequential", "--skip_generation_tests", "--retention_eval_steps=2")
    assert cli.main(argv) == 0
    # per batch of 2: pre and post; then retention after 2 and 4 edits; the last model once (final), not twice
    assert scored == [2, 2, 2, 2, 2, 4, 2, 2, N_CASES]
    run_dir = next((tmp_path / "results" / "EMMET").glob("run_*"))
    retention = read_json(run_dir / f"retention_{N_CASES}edits.json")
    for case_id, case in read_cases(run_dir).items():
        assert retention["cases"][str(case_id)] == Evaluation("cf").scores(case["final"])


def test_retention_checkpoints_rescore_the_cases_edited_so_far(ws, lifelong_run):
    run_dir, _ = lifelong_run
    files = sorted(p.name for p in run_dir.glob("retention_*edits.json"))
    assert files == ["retention_4edits.json"]  # 6 cases in batches of 2: 4 is the only multiple of 4 reached
    retention = read_json(run_dir / "retention_4edits.json")
    assert retention["num_edits_done"] == 4 and retention["after_batch"] == 1
    assert sorted(retention["cases"]) == sorted(str(r["case_id"]) for r in ws.records[:4])
    cases = read_cases(run_dir)
    # After batch 1, batch 1's cases are exactly as their "post" said.
    for record in ws.records[2:4]:
        expected = counterfact_case_scores(cases[record["case_id"]]["post"])
        assert retention["cases"][str(record["case_id"])] == pytest.approx(expected, rel=1e-4, abs=1e-8)
    means = retention["mean"]
    assert means["ES"] == pytest.approx(sum(c["ES"] for c in retention["cases"].values()) / 4)


def test_downstream_checkpoints_at_zero_every_n_and_the_end(lifelong_run):
    run_dir, _ = lifelong_run
    assert sorted(p.name for p in run_dir.glob("downstream_*edits.json")) == [
        "downstream_0edits.json", "downstream_4edits.json", "downstream_6edits.json"]
    zero = read_json(run_dir / "downstream_0edits.json")
    assert zero["num_edits_done"] == 0 and zero["after_batch"] == -1
    assert set(zero["tasks"]) == {"sst2", "mmlu"}
    for result in zero["tasks"].values():
        assert result["n"] == 3 and result["k"] == 1 and 0 <= result["accuracy"] <= 1
    assert zero["perplexity"]["value"] > 1
    params = read_json(run_dir / "params.json")
    assert params["downstream"]["run"] is True and set(params["downstream"]["tasks"]) == {"sst2", "mmlu"}


def test_weight_norms_line_per_batch_by_hand(ws, lifelong_run):
    run_dir, model = lifelong_run
    lines = read_jsonl(run_dir / WEIGHT_NORMS_FILE)
    assert [line["batch"] for line in lines] == [0, 1, 2]
    assert [line["num_edits_done"] for line in lines] == [2, 4, 6]
    w0 = load_model(str(ws.model_dir))[0].get_submodule(REWRITE_MODULE).weight.double()
    w_last = model.get_submodule(REWRITE_MODULE).weight.double()
    last = lines[-1]["matrices"][REWRITE_MODULE]
    assert last["weight_norm"] == pytest.approx(w_last.norm().item(), rel=1e-9)
    assert last["distance_from_initial"] == pytest.approx((w_last - w0).norm().item(), rel=1e-9)
    # ‖W_2 − W_0‖ ≤ the sum of the three batches' ‖Δ_t‖ (triangle inequality), and batch 0's Δ is W_1 − W_0.
    updates = [line["matrices"][REWRITE_MODULE]["update_norm"] for line in lines]
    assert lines[0]["matrices"][REWRITE_MODULE]["distance_from_initial"] == pytest.approx(updates[0], rel=1e-9)
    assert last["distance_from_initial"] <= sum(updates) * (1 + 1e-9)


def test_weight_norms_helper_by_hand():
    current = {"w": torch.tensor([[3.0, 4.0]])}
    norms = weight_norms(current, {"w": torch.tensor([[0.0, 4.0]])}, {"w": torch.tensor([[3.0, 0.0]])})
    assert norms == {"w": {"weight_norm": 5.0, "distance_from_initial": 3.0, "update_norm": 4.0}}


def test_saved_model_loads_with_plain_transformers_and_prefers_the_new_targets(ws, lifelong_run):
    run_dir, edited = lifelong_run
    saved_dir = run_dir / f"edited_model_{N_CASES}edits"
    edits = json.loads((saved_dir / "edits.json").read_text())
    assert edits["case_ids"] == [r["case_id"] for r in ws.records] and edits["num_edits_done"] == N_CASES
    assert list(saved_dir.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(saved_dir).eval()
    tok = AutoTokenizer.from_pretrained(saved_dir)
    assert torch.equal(model.get_submodule(REWRITE_MODULE).weight, edited.get_submodule(REWRITE_MODULE).weight)
    cases = read_cases(run_dir)
    for record in ws.records:
        final = cases[record["case_id"]]["final"]
        reloaded = counterfact_case_metrics(model, tok, record)
        assert nlls(reloaded) == pytest.approx(nlls(final), rel=1e-5)
        # It holds the edits as the run measured them: new target preferred wherever the run said so.
        assert counterfact_case_scores(reloaded)["ES"] == counterfact_case_scores(final)["ES"]
    assert sum(counterfact_case_scores(cases[r["case_id"]]["final"])["ES"] for r in ws.records) >= N_CASES - 1


def test_summarize_tables_and_plots_a_sequential_run(lifelong_run, tmp_path, capsys):
    run_dir, _ = lifelong_run
    summary = summarize.summarize_run(run_dir)
    rows = {row["edits"]: row for row in summary["checkpoints"]}
    assert sorted(rows) == [0, 4, 6]
    retention = read_json(run_dir / "retention_4edits.json")
    assert rows[4]["retention_ES"] == pytest.approx(100 * retention["mean"]["ES"])
    downstream = read_json(run_dir / "downstream_4edits.json")
    assert rows[4]["sst2_accuracy"] == pytest.approx(100 * downstream["tasks"]["sst2"]["accuracy"])
    assert rows[4]["perplexity"] == pytest.approx(downstream["perplexity"]["value"])
    norms = read_jsonl(run_dir / WEIGHT_NORMS_FILE)
    assert rows[4]["max_distance_from_initial"] == pytest.approx(norms[1]["matrices"][REWRITE_MODULE]["distance_from_initial"])
    assert "retention_ES" not in rows[0] and "post_ES" not in rows[0]
    assert rows[6]["retention_ES"] == pytest.approx(summary["final_ES_mean"])  # the end: "final" of every case
    out_csv, out_png = tmp_path / "s.csv", tmp_path / "s.png"
    assert summarize.main([str(run_dir), "--csv", str(out_csv), "--plot", str(out_png)]) == 0
    printed = capsys.readouterr().out
    assert "sequential checkpoints" in printed and "final" in printed
    assert (tmp_path / "s_checkpoints.csv").read_text().count("\n") == 4  # header + 3 checkpoints
    import matplotlib.image
    assert matplotlib.image.imread(out_png).ndim == 3


def test_lifelong_flags_need_sequential(ws, tmp_path, capsys):
    assert cli.main(argv_for(ws, tmp_path / "results", "--retention_eval_steps=2")) == 2
    err = capsys.readouterr().err
    assert "--retention_eval_steps" in err and "--sequential" in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()


def test_missing_downstream_file_is_one_error_before_any_work(ws, tmp_path, capsys):
    empty = tmp_path / "data"
    empty.mkdir()
    (empty / "counterfact.json").write_text((ws.data_dir / "counterfact.json").read_text())
    argv = argv_for(ws, tmp_path / "results", "--sequential", "--do_downstream_eval", "--downstream_tasks=cola",
                    "--number_of_few_shots=1", "--number_of_tests=2")
    argv = [a for a in argv if not a.startswith("--data_dir")] + [f"--data_dir={empty}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "SHARED_DATA_DIR", tmp_path / "no_shared")
        patch.setattr(cli.G, "data_dir", lambda: tmp_path / "no_default")
        patch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "cola" in err and str(empty) in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()


def test_killed_lifelong_run_resumes_with_every_file_once(ws, lifelong_run, tmp_path):
    reference_dir, _ = lifelong_run
    argv = argv_for(ws, tmp_path / "results", *SEQUENTIAL, "--save_model")
    run_dir = tmp_path / "results" / "EMMET" / "run_000"
    log_path = tmp_path / "killed.log"
    # Kill once batch 1's retention checkpoint exists: the edits of batches 0-1 and their files are done.
    run_and_kill(argv, [run_dir / "retention_4edits.json"], log_path)
    assert read_json(run_dir / "params.json")["status"] == "running"
    assert not (run_dir / "downstream_6edits.json").exists()
    assert cli.main(argv + ["--continue_from_run=run_000"]) == 0

    names = sorted(p.name for p in run_dir.iterdir())
    reference_names = sorted(p.name for p in reference_dir.iterdir())
    assert names == reference_names  # every case, checkpoint, norms and saved-model file once, no leftovers
    resumed, reference = read_cases(run_dir), read_cases(reference_dir)
    for case_id, case in reference.items():
        for when in ("pre", "post", "final"):
            assert nlls(resumed[case_id][when]) == pytest.approx(nlls(case[when]), rel=1e-4, abs=1e-6)
    assert [line["batch"] for line in read_jsonl(run_dir / WEIGHT_NORMS_FILE)] == [0, 1, 2]
    for name in ("retention_4edits.json", "downstream_0edits.json", "downstream_6edits.json"):
        ours, theirs = read_json(run_dir / name), read_json(reference_dir / name)
        assert ours["num_edits_done"] == theirs["num_edits_done"]
    assert read_json(run_dir / "downstream_6edits.json")["perplexity"]["value"] == pytest.approx(
        read_json(reference_dir / "downstream_6edits.json")["perplexity"]["value"], rel=1e-4)


def test_cli_reads_published_statistics_and_records_their_provenance(ws, tmp_path):
    """--published_stats_dir: C0 comes from a reference-layout .npz; params.json names the file and its sha256."""
    import hashlib

    import numpy as np

    from tests.test_statistics_scale import write_reference_npz

    g = np.random.default_rng(0)
    keys = g.standard_normal((500, 64))
    npz = write_reference_npz(tmp_path / "published" / "gpt2-xl" / "wikipedia_stats" /
                              f"{REWRITE_MODULE}_float32_mom2_100000.npz", keys.T @ keys, 500)
    argv = argv_for(ws, tmp_path / "results", "--dataset_size_limit=2", "--skip_generation_tests",
                    f"--published_stats_dir={tmp_path / 'published'}", f"--stats_dir={tmp_path / 'stats'}")
    assert cli.main(argv) == 0
    params = read_json(tmp_path / "results" / "EMMET" / "run_000" / "params.json")
    published = params["statistics"][REWRITE_MODULE]["published"]
    assert published["path"] == str(npz) and published["count"] == 500
    assert published["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert params["args"]["published_stats_dir"] == str(tmp_path / "published")
