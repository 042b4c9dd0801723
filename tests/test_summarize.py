"""experiments/summarize.py on hand-made run directories whose scores are worked out by hand."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from experiments import summarize
from experiments.summarize import find_runs, format_table, main, plot_runs, summarize_run

REPO_ROOT = Path(__file__).resolve().parents[1]


def nll_pairs(*pairs):
    """counterfact_case_metrics' per-prompt structure from (nll of target_new, nll of target_true) pairs."""
    return [{"target_new": new, "target_true": true} for new, true in pairs]


# Post-edit metrics of two cases (new < true is a success for ES/PS; true < new for NS):
#   case 0: ES 1, PS 1/2, NS 1; case 1: ES 1/2, PS 0, NS 1/2
#   -> ES 75 ± 25, PS 25 ± 25, NS 75 ± 25 (population std); S = 3 / (1/75 + 1/25 + 1/75) = 45.
POST = [
    {"rewrite_prompts_nll": nll_pairs((1, 2)),
     "paraphrase_prompts_nll": nll_pairs((1, 2), (3, 2)),
     "neighborhood_prompts_nll": nll_pairs((2, 1), (2, 1)),
     "generation": {"ngram_entropy": 6.0, "reference_score": 0.1}},
    {"rewrite_prompts_nll": nll_pairs((1, 2), (3, 2)),
     "paraphrase_prompts_nll": nll_pairs((3, 2), (3, 2)),
     "neighborhood_prompts_nll": nll_pairs((2, 1), (1, 2)),
     "generation": {"ngram_entropy": 6.5, "reference_score": 0.3}},
]
# Pre-edit: ES 0, PS 0, NS 1 in both cases -> S = 0.
PRE = [{"rewrite_prompts_nll": nll_pairs((2, 1)),
        "paraphrase_prompts_nll": nll_pairs((2, 1)),
        "neighborhood_prompts_nll": nll_pairs((2, 1))}] * 2


def make_run(root, alg="MEMIT", run=0, num_edits=2, ds_name="mcf", post=POST, pre=PRE, hparams=None,
             edit_times=None, status="finished", num_cases=None, extra_params=None):
    """A run directory in the results format: params.json plus one case file per metrics dict,
    cases grouped into batches of num_edits with the given per-batch edit times."""
    run_dir = Path(root) / alg / f"run_{run:03d}"
    run_dir.mkdir(parents=True)
    params = {"alg_name": alg, "model_name": "gpt2-xl", "hparams_fname": f"/x/hparams/{alg}/gpt2-xl.json",
              "hparams": hparams or {}, "args": {"num_edits": num_edits}, "ds_name": ds_name,
              "num_cases": len(post) if num_cases is None else num_cases, "status": status,
              **(extra_params or {})}
    (run_dir / "params.json").write_text(json.dumps(params))
    for case_id, (pre_metrics, post_metrics) in enumerate(zip(pre, post)):
        batch = case_id // num_edits
        case = {"case_id": case_id, "batch": batch, "num_edits": num_edits, "sequential": False,
                "edit_time": (edit_times or {}).get(batch, 1.0), "requested_rewrite": {},
                "pre": pre_metrics, "post": post_metrics}
        (run_dir / f"case_{case_id}.json").write_text(json.dumps(case))
    return run_dir


def table_row(table: str, metric: str) -> str:
    return next(line for line in table.splitlines() if line.strip().split(" ")[0] == metric)


def test_counterfact_run_stats_and_table(tmp_path):
    run_dir = make_run(tmp_path, edit_times={0: 3.0}, extra_params={"total_seconds": 12.5})
    summary = summarize_run(run_dir)

    assert summary["post_ES_mean"] == pytest.approx(75) and summary["post_ES_std"] == pytest.approx(25)
    assert summary["post_PS_mean"] == pytest.approx(25) and summary["post_PS_std"] == pytest.approx(25)
    assert summary["post_NS_mean"] == pytest.approx(75) and summary["post_NS_std"] == pytest.approx(25)
    assert summary["post_S"] == pytest.approx(45)
    assert summary["pre_ES_mean"] == 0 and summary["pre_NS_mean"] == pytest.approx(100)
    assert summary["pre_S"] == 0
    em_case0 = math.exp(-1) - math.exp(-2)
    em_case1 = ((math.exp(-1) - math.exp(-2)) + (math.exp(-3) - math.exp(-2))) / 2
    assert summary["post_EM_mean"] == pytest.approx(100 * (em_case0 + em_case1) / 2)
    assert summary["post_EM_std"] == pytest.approx(100 * abs(em_case0 - em_case1) / 2)
    # GE ×100 on generation.py's scale (6.0, 6.5 -> 625 ± 25), RS cosine ×100 (0.1, 0.3 -> 20 ± 10).
    assert summary["post_GE_mean"] == pytest.approx(625) and summary["post_GE_std"] == pytest.approx(25)
    assert summary["post_RS_mean"] == pytest.approx(20) and summary["post_RS_std"] == pytest.approx(10)
    assert "pre_GE_mean" not in summary
    assert summary["cases"] == 2 and summary["cases_missing"] == 0 and summary["cases_unparseable"] == 0
    assert (summary["batches"], summary["edit_time_mean"], summary["edit_time_total"]) == (1, 3.0, 3.0)
    assert summary["num_edits"] == 2 and summary["alg"] == "MEMIT" and summary["hparams"] == "gpt2-xl.json"

    table = format_table(summary)
    assert "75.00 ± 25.00" in table_row(table, "ES") and "0.00 ± 0.00" in table_row(table, "ES")
    assert "25.00 ± 25.00" in table_row(table, "PS")
    assert "100.00 ± 0.00" in table_row(table, "NS") and "75.00 ± 25.00" in table_row(table, "NS")
    assert "625.00 ± 25.00" in table_row(table, "GE")
    assert table_row(table, "S").split()[1:3] == ["0.00", "45.00"]
    assert "[finished]" in table and "12.50 s" in table and "626" in table


def test_edit_time_counts_each_batch_once(tmp_path):
    run_dir = make_run(tmp_path, post=POST * 2, pre=PRE * 2, num_edits=2, edit_times={0: 2.0, 1: 4.0})
    summary = summarize_run(run_dir)
    assert (summary["batches"], summary["edit_time_mean"], summary["edit_time_total"]) == (2, 3.0, 6.0)


def test_fastmemit_descriptors_and_missing_cases(tmp_path):
    run_dir = make_run(tmp_path, hparams={"dynamic": True, "dynamic_multiplier": 10}, num_cases=5,
                       status="running")
    summary = summarize_run(run_dir)
    assert summary["dynamic"] is True and summary["dynamic_multiplier"] == 10
    assert summary["cases_expected"] == 5 and summary["cases_missing"] == 3
    table = format_table(summary)
    assert "[running]" in table and "multiplier 10" in table and "missing 3" in table


def test_zsre_token_accuracy(tmp_path):
    # ES 1/2, PS 2/2, NS 3/4 -> 50, 100, 75; S = 3 / (1/50 + 1/100 + 1/75) = 900/13.
    post = [{"rewrite_prompts_correct": [[True, False]],
             "paraphrase_prompts_correct": [[True], [True]],
             "neighborhood_prompts_correct": [[False, True, True, True]]}]
    pre = [{"rewrite_prompts_correct": [[False, False]],
            "paraphrase_prompts_correct": [[False], [True]],
            "neighborhood_prompts_correct": [[False, True, True, True]]}]
    summary = summarize_run(make_run(tmp_path, ds_name="zsre", post=post, pre=pre, num_edits=1))
    assert summary["post_ES_mean"] == pytest.approx(50)
    assert summary["post_PS_mean"] == pytest.approx(100)
    assert summary["post_NS_mean"] == pytest.approx(75)
    assert summary["post_S"] == pytest.approx(900 / 13)
    assert summary["pre_PS_mean"] == pytest.approx(50) and summary["pre_S"] == 0
    assert "post_EM_mean" not in summary
    assert "token accuracy" in format_table(summary)


def test_unparseable_case_warned_skipped_counted(tmp_path, capsys):
    run_dir = make_run(tmp_path, num_cases=4)
    (run_dir / "case_7.json").write_text("{not json")
    (run_dir / "case_8.json").write_text(json.dumps({"case_id": 8, "pre": {}, "post": {
        "rewrite_prompts_nll": [[1, 2]]}}))  # a list where a {target_new, target_true} object belongs
    (run_dir / ".case_9.json.abc123.tmp").write_text("{half written")  # an atomic write in progress
    summary = summarize_run(run_dir)
    err = capsys.readouterr().err
    assert "case_7.json" in err and "case_8.json" in err and "case_9" not in err
    assert summary["cases"] == 2 and summary["cases_unparseable"] == 2 and summary["cases_missing"] == 0
    assert summary["post_ES_mean"] == pytest.approx(75)


def test_first_n_cases(tmp_path):
    run_dir = make_run(tmp_path)
    summary = summarize_run(run_dir, first_n_cases=1)
    assert summary["cases"] == 1 and summary["post_ES_mean"] == pytest.approx(100)
    assert summary["post_S"] == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 100))


def test_bad_params_is_a_clear_error(tmp_path):
    run_dir = make_run(tmp_path, ds_name="wiki")
    with pytest.raises(summarize.RunError, match="ds_name"):
        summarize_run(run_dir)


def test_directory_arguments_expand_to_runs(tmp_path):
    root = tmp_path / "results"
    emmet_runs = [make_run(root, alg="EMMET", run=i) for i in (0, 1)]
    memit_run = make_run(root, alg="MEMIT", run=0)
    assert find_runs(emmet_runs[1]) == [emmet_runs[1]]
    assert find_runs(root / "EMMET") == emmet_runs
    assert sorted(find_runs(root)) == sorted(emmet_runs + [memit_run])
    (tmp_path / "empty").mkdir()
    with pytest.raises(summarize.RunError, match="no run"):
        find_runs(tmp_path / "empty")


def test_plot_lines_per_algorithm_and_dynamic_variant(tmp_path):
    root = tmp_path / "results"
    one_success = [POST[0]]  # ES 100
    half_success = [POST[1]]  # ES 50
    summaries = [summarize_run(run) for run in (
        make_run(root, alg="MEMIT", run=0, num_edits=1, post=one_success, pre=PRE[:1]),
        make_run(root, alg="MEMIT", run=1, num_edits=4, post=half_success, pre=PRE[:1]),
        make_run(root, alg="MEMIT", run=2, num_edits=4, post=one_success, pre=PRE[:1],
                 hparams={"dynamic": True, "dynamic_multiplier": 10}),
        make_run(root, alg="EMMET", run=0, num_edits=2, post=one_success, pre=PRE[:1]),
        make_run(root, alg="EMMET", run=1, num_edits=2, post=half_success, pre=PRE[:1]),
    )]
    png = tmp_path / "plots" / "sweep.png"
    fig = plot_runs(summaries, png)

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100
    titles = [ax.get_title() for ax in fig.axes]
    assert [t.split()[1] for t in titles] == ["ES", "PS", "NS", "S", "GE"]
    es_axis = fig.axes[0]
    lines = {line.get_label(): line for line in es_axis.get_lines()}
    assert set(lines) == {"MEMIT", "MEMIT (dynamic ×10)", "EMMET"}
    assert list(lines["MEMIT"].get_xdata()) == [1, 4] and list(lines["MEMIT"].get_ydata()) == [100, 50]
    # The two EMMET runs at batch size 2 are averaged (ES 100 and 50) and marked as such.
    assert list(lines["EMMET"].get_ydata()) == [75]
    assert any(text.get_text() == "avg of 2" for text in es_axis.texts)
    assert es_axis.get_xscale() == "log"


def test_plot_works_with_one_run(tmp_path):
    summary = summarize_run(make_run(tmp_path, post=[{k: v for k, v in POST[0].items() if k != "generation"}],
                                     pre=PRE[:1], num_edits=1))
    fig = plot_runs([summary], tmp_path / "one.png")
    assert [ax.get_title().split()[1] for ax in fig.axes] == ["ES", "PS", "NS", "S"]
    assert matplotlib.image.imread(tmp_path / "one.png").shape[0] > 100


def test_main_writes_csv_json_and_plot(tmp_path, capsys):
    root = tmp_path / "results"
    make_run(root, alg="EMMET", run=0)
    make_run(root, alg="MEMIT", run=0, num_edits=1, post=POST[:1], pre=PRE[:1],
             hparams={"dynamic": True, "dynamic_multiplier": 3})
    out_csv, out_json, out_png = tmp_path / "s.csv", tmp_path / "s.json", tmp_path / "s.png"
    assert main([str(root), "--csv", str(out_csv), "--json", str(out_json), "--plot", str(out_png)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("== ") == 2 and "EMMET" in printed

    rows = {row["alg"]: row for row in csv.DictReader(out_csv.open())}
    assert float(rows["EMMET"]["post_ES_mean"]) == pytest.approx(75)
    assert float(rows["EMMET"]["post_ES_std"]) == pytest.approx(25)
    assert float(rows["EMMET"]["post_S"]) == pytest.approx(45)
    assert float(rows["EMMET"]["pre_S"]) == 0
    assert rows["MEMIT"]["dynamic"] == "True" and rows["MEMIT"]["dynamic_multiplier"] == "3"
    assert float(rows["MEMIT"]["post_ES_mean"]) == pytest.approx(100)

    records = {record["alg"]: record for record in json.loads(out_json.read_text())}
    assert records["EMMET"]["post_NS_mean"] == pytest.approx(75)
    assert records["EMMET"]["post_GE_mean"] == pytest.approx(625)
    assert records["MEMIT"]["num_edits"] == 1 and records["MEMIT"]["cases"] == 1
    assert matplotlib.image.imread(out_png).ndim == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_main_reports_bad_path(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_entry_points(tmp_path):
    run_dir = make_run(tmp_path)
    for command in ([sys.executable, "experiments/summarize.py", str(run_dir)],
                    [sys.executable, "-m", "experiments.summarize", str(run_dir)]):
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "75.00 ± 25.00" in result.stdout
