"""The CLI with the evaluation beyond teacher forcing (SPEC §11) end to end on the tiny GPT-2: generation-based
scores and portability/locality in pre, post, final and retention; KnowEdit and MQuAKE runs from --dataset_file;
--chat_template; and what summarize makes of them."""
import json

import pytest

from experiments import evaluate_unified_editing as cli
from experiments import summarize
from tests.cli_workspace import argv_for, read_cases
from tests.test_mquake import CASES as MQUAKE_CASES
from util.io import read_json

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    monkeypatch.setenv("KE_NO_DOWNLOAD", "1")


def with_portability(record: dict) -> dict:
    """A ws record with EasyEdit's one-hop portability and subject-replace fields."""
    rewrite = record["requested_rewrite"]
    return {**record, "portability": {"New Question": f"Which language is {rewrite['subject']} linked to?",
                                      "New Answer": rewrite["target_new"]["str"]},
            "alternative_subject": "the person known as " + rewrite["subject"].split()[0]}


def knowedit_records(ws) -> list:
    """KnowEdit WikiData-recent style records (no ground truth; locality with alias lists) from ws's facts."""
    records = []
    for record in ws.records[:4]:
        rewrite = record["requested_rewrite"]
        records.append({"subject": rewrite["subject"], "prompt": rewrite["prompt"].format(rewrite["subject"]),
                        "target_new": rewrite["target_new"]["str"], "portability": {},
                        "locality": {"Relation_Specificity": [{"prompt": f"The birthplace of {rewrite['subject']} is",
                                                               "ground_truth": [["Paris", "Lutetia"]]}]}})
    return records


def test_generation_metrics_and_portability_in_a_sequential_run(ws, tmp_path):
    data = tmp_path / "portability.json"
    data.write_text(json.dumps([with_portability(r) for r in ws.records]))
    results = tmp_path / "results"
    argv = argv_for(ws, results, "--sequential", "--skip_generation_tests", "--generation_metrics",
                    "--retention_eval_steps=2", f"--dataset_file={data}", "--dataset_size_limit=4")
    assert cli.main(argv) == 0
    run_dir = results / "EMMET" / "run_000"
    params = read_json(run_dir / "params.json")
    assert params["evaluation"] == {"kind": "cf", "generation_metrics": True, "chat_template": False}
    assert params["args"]["dataset_file"] == str(data)
    for case in read_cases(run_dir).values():
        for side in ("pre", "post", "final"):
            metrics = case[side]
            assert [len(metrics["generated"][g]) for g in ("rewrite_prompts", "paraphrase_prompts",
                                                           "neighborhood_prompts")] == [1, 2, 2]
            assert set(metrics["portability"]) == {"one_hop", "subject_replace"}
            for result in metrics["portability"]["one_hop"]:
                assert 0 <= result["acc"] <= 1 and isinstance(result["success"], bool) and "answer" in result
    retention = read_json(run_dir / "retention_2edits.json")
    assert {"ES", "GES", "GPS", "GNS", "portability_one_hop_acc", "portability_subject_replace_G"} <= set(
        retention["mean"])
    summary = summarize.summarize_run(run_dir)
    for name in ("GES", "GPS", "GNS", "portability_one_hop_acc", "portability_one_hop_G"):
        assert f"post_{name}_mean" in summary and f"final_{name}_mean" in summary
    assert "post_GS" in summary and any("retention_GES" in row for row in summary["checkpoints"])
    table = summarize.format_table(summary)
    assert "GES" in table and "portability_subject_replace_G" in table and "retention GES/GPS/GNS (GS)" in table
    teacher_forced, generated = table.index("\n  ES "), table.index("\n  GES ")
    assert generated > teacher_forced and table.index("\n  PS ") > generated  # side by side


def test_knowedit_run_scores_locality_and_whether_answers_changed(ws, tmp_path):
    data = tmp_path / "recent.json"
    data.write_text(json.dumps(knowedit_records(ws)))
    results = tmp_path / "results"
    argv = [a for a in argv_for(ws, results, "--generation_metrics", f"--dataset_file={data}") if
            not a.startswith("--ds_name")] + ["--ds_name=knowedit_recent"]
    assert cli.main(argv) == 0
    run_dir = results / "EMMET" / "run_000"
    cases = read_cases(run_dir)
    assert len(cases) == 4
    for case in cases.values():
        post = case["post"]["locality"]["relation_specificity"][0]
        assert set(post) == {"acc", "answer", "success", "unchanged"}
        assert "unchanged" not in case["pre"]["locality"]["relation_specificity"][0]
        assert "rewrite_prompts_correct" in case["post"]  # token accuracy: KnowEdit has no true target here
    summary = summarize.summarize_run(run_dir)
    assert {"post_ES_mean", "post_GES_mean", "post_locality_relation_specificity_unchanged_mean"} <= set(summary)


def test_mquake_run_edits_each_case_in_one_batch_and_asks_its_questions(ws, tmp_path):
    data = tmp_path / "mquake.json"
    data.write_text(json.dumps(MQUAKE_CASES[:2]))
    prompts = ws.data_dir / "mquake_prompts"
    prompts.mkdir(exist_ok=True)
    (prompts / "multihop-prompts.txt").write_text("Q: Who wrote Hamlet? A: William Shakespeare\n")
    results = tmp_path / "results"
    argv = [a for a in argv_for(ws, results, f"--dataset_file={data}", "--num_edits=1") if
            not a.startswith(("--ds_name", "--num_edits=2"))] + ["--ds_name=mquake"]
    assert cli.main(argv) == 0
    run_dir = results / "EMMET" / "run_000"
    params = read_json(run_dir / "params.json")
    assert params["evaluation"]["kind"] == "mquake" and params["evaluation"]["fewshot_prompt"] == str(ws.data_dir)
    for record in MQUAKE_CASES[:2]:
        case = read_cases(run_dir)[record["case_id"]]
        edits = case["edit"]["requests"] if len(record["requested_rewrite"]) > 1 else [case["edit"]]
        assert len(edits) == len(record["requested_rewrite"])  # every rewrite of the case, in its one batch
        assert all("target_optimisation" in edit for edit in edits)
        assert len(case["post"]["multihop_questions"]) == 3
    summary = summarize.summarize_run(run_dir)
    assert {"post_multihop_mean", "pre_multihop_original_mean", "post_single_hop_mean"} <= set(summary)


def test_chat_template_wraps_prompts_and_a_tokenizer_without_one_is_refused(ws, tmp_path, capsys):
    results = tmp_path / "results"
    assert cli.main(argv_for(ws, results, "--chat_template", "--skip_generation_tests", "--dataset_size_limit=2")) == 0
    assert read_json(results / "EMMET" / "run_000" / "params.json")["evaluation"]["chat_template"] is True
    plain = tmp_path / "plain-model"
    plain.mkdir()
    for path in ws.model_dir.iterdir():
        (plain / path.name).write_bytes(path.read_bytes())
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    argv = [a if not a.startswith("--model_name") else f"--model_name={plain}" for a in
            argv_for(ws, tmp_path / "refused", "--chat_template", "--dataset_size_limit=2")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("evaluate_unified_editing: error: the tokenizer of") and "has no chat template in " \
        "--chat_template: leave --chat_template off or use a chat model's tokenizer" in err
    assert not list((tmp_path / "refused").glob("*/run_*/case_*.json"))
