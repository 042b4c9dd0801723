"""MQuAKE: the loader on hand-written cases in the real schema (the records are not in ../shared), the edit
requests of a case, the few-shot prompt, and the multi-hop metrics by hand on a scripted model."""
import copy
import json

import pytest

from dsets.download import DatasetNotFound
from algs.requests import requests_of
from dsets.mquake import MQuAKEDataset, load_fewshot_prompt
from experiments.metrics.mquake import mquake_case_scores, mquake_metrics_many, mquake_prompt
from tests.conftest import shared_path
from tests.fake_lm import ScriptedLM, one_thread  # noqa: F401
from experiments.metrics.chat import chat_prompt
from util.checks import check_requests
from util.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")


def hop(question, cloze, answer, aliases):
    return {"question": question, "cloze": cloze, "answer": answer, "answer_alias": aliases}


CASES = [
    {   # MQuAKE-CF (the README's example): a 4-hop chain, 2 edits
        "case_id": 2500,
        "requested_rewrite": [
            {"prompt": "{} is a citizen of", "relation_id": "P27", "target_new": {"str": "Libya", "id": "Q1016"},
             "target_true": {"str": "United States of America", "id": "Q30"}, "subject": "Vince McMahon",
             "question": "What is the country of citizenship of Vince McMahon?"},
            {"prompt": "The capital of {} is", "relation_id": "P36",
             "target_new": {"str": "Franklin", "id": "Q1778943"}, "target_true": {"str": "Tripoli", "id": "Q3579"},
             "subject": "Libya",
             "question": "What is the capital of Libya?"},
        ],
        "questions": [
            "What city serves as the capital of the country where the CEO of Triple H holds citizenship?",
            "In which city is the capital of the country where the chief executive officer of Triple H is a citizen?",
            "What is the name of the capital city of the country where the CEO of Triple H is a citizen?",
        ],
        "answer": "Washington, D.C.", "answer_alias": ["Washington", "DC", "Washington DC", "D.C."],
        "new_answer": "Franklin", "new_answer_alias": ["Franklin, Kentucky", "Franklin, KY"],
        "single_hops": [
            hop("Who is the employer of Triple H?", "Triple H is employed by", "WWE", ["World Wrestling Federation"]),
            hop("Who is the chief executive officer of WWE?", "The chief executive officer of WWE is", "Vince McMahon",
                ["Vincent Kennedy McMahon"]),
            hop("What is the country of citizenship of Vince McMahon?", "Vince McMahon is a citizen of",
                "United States of America", ["USA", "United States"]),
            hop("What is the capital of United States of America?", "The capital of United States of America is",
                "Washington, D.C.", ["Washington", "DC"]),
        ],
        "new_single_hops": [
            hop("Who is the employer of Triple H?", "Triple H is employed by", "WWE", ["World Wrestling Federation"]),
            hop("Who is the chief executive officer of WWE?", "The chief executive officer of WWE is", "Vince McMahon",
                ["Vincent Kennedy McMahon"]),
            hop("What is the country of citizenship of Vince McMahon?", "Vince McMahon is a citizen of", "Libya",
                ["State of Libya"]),
            hop("What is the capital of Libya?", "The capital of Libya is", "Franklin", ["Franklin, Kentucky"]),
        ],
        "orig": {
            "triples": [["Q44567", "P108", "Q35339"], ["Q35339", "P169", "Q44430"], ["Q44430", "P27", "Q30"],
                        ["Q30", "P36", "Q61"]],
            "triples_labeled": [["Triple H", "employer", "WWE"], ["WWE", "chief executive officer", "Vince McMahon"],
                                ["Vince McMahon", "country of citizenship", "United States of America"],
                                ["United States of America", "capital", "Washington, D.C."]],
            "new_triples": [["Q44567", "P108", "Q35339"], ["Q35339", "P169", "Q44430"], ["Q44430", "P27", "Q1016"],
                            ["Q1016", "P36", "Q1778943"]],
            "new_triples_labeled": [["Triple H", "employer", "WWE"],
                                    ["WWE", "chief executive officer", "Vince McMahon"],
                                    ["Vince McMahon", "country of citizenship", "Libya"],
                                    ["Libya", "capital", "Franklin"]],
            "edit_triples": [["Q44430", "P27", "Q1016"], ["Q1016", "P36", "Q1778943"]],
        },
    },
    {   # a 2-hop chain, 1 edit
        "case_id": 17,
        "requested_rewrite": [
            {"prompt": "{} is located in the country of", "relation_id": "P17",
             "target_new": {"str": "Italy", "id": "Q38"}, "target_true": {"str": "France", "id": "Q142"},
             "subject": "Eiffel Tower",
             "question": "Which country is Eiffel Tower located in?"},
        ],
        "questions": ["What is the capital of the country where the Eiffel Tower is located?",
                      "Which city is the capital of the country that is home to the Eiffel Tower?",
                      "The Eiffel Tower is in a country whose capital is which city?"],
        "answer": "Paris", "answer_alias": ["City of Light"], "new_answer": "Rome",
        "new_answer_alias": ["Roma", "Eternal City"],
        "single_hops": [hop("Which country is Eiffel Tower located in?", "Eiffel Tower is located in the country of",
                            "France", ["French Republic"]),
                        hop("What is the capital of France?", "The capital of France is", "Paris", ["City of Light"])],
        "new_single_hops": [hop("Which country is Eiffel Tower located in?",
                                "Eiffel Tower is located in the country of", "Italy", ["Italian Republic"]),
                            hop("What is the capital of Italy?", "The capital of Italy is", "Rome", ["Roma"])],
        "orig": {"triples": [["Q243", "P17", "Q142"], ["Q142", "P36", "Q90"]],
                 "triples_labeled": [["Eiffel Tower", "country", "France"], ["France", "capital", "Paris"]],
                 "new_triples": [["Q243", "P17", "Q38"], ["Q38", "P36", "Q220"]],
                 "new_triples_labeled": [["Eiffel Tower", "country", "Italy"], ["Italy", "capital", "Rome"]],
                 "edit_triples": [["Q243", "P17", "Q38"]]},
    },
    {   # MQuAKE-T: a real-world update, with answer_extended
        "case_id": 5,
        "requested_rewrite": [
            {"prompt": "The name of the current head of the {} government is", "relation_id": "P6",
             "target_new": {"str": "Rishi Sunak", "id": "Q7332"},
             "target_true": {"str": "Boris Johnson", "id": "Q180589"},
             "subject": "United Kingdom", "question": "Who is the head of government of United Kingdom?"},
        ],
        "questions": ["Who is the spouse of the head of government of the United Kingdom?",
                      "Who is married to the British head of government?",
                      "Who is the wife of the current head of government of the United Kingdom?"],
        "answer": "Carrie Johnson", "answer_alias": ["Carrie Symonds"], "answer_extended": ["Marina Wheeler"],
        "new_answer": "Akshata Murty", "new_answer_alias": ["Akshata Murthy"],
        "single_hops": [hop("Who is the head of government of United Kingdom?",
                            "The head of government of United Kingdom is", "Boris Johnson", ["BoJo"]),
                        hop("Who is Boris Johnson married to?", "Boris Johnson is married to", "Carrie Johnson",
                            ["Carrie Symonds"])],
        "new_single_hops": [hop("Who is the head of government of United Kingdom?",
                                "The head of government of United Kingdom is", "Rishi Sunak", []),
                            hop("Who is Rishi Sunak married to?", "Rishi Sunak is married to", "Akshata Murty",
                                ["Akshata Murthy"])],
        "orig": {"triples": [["Q145", "P6", "Q180589"], ["Q180589", "P26", "Q63984473"]],
                 "triples_labeled": [["United Kingdom", "head of government", "Boris Johnson"],
                                     ["Boris Johnson", "spouse", "Carrie Johnson"]],
                 "new_triples": [["Q145", "P6", "Q7332"], ["Q7332", "P26", "Q61917327"]],
                 "new_triples_labeled": [["United Kingdom", "head of government", "Rishi Sunak"],
                                         ["Rishi Sunak", "spouse", "Akshata Murty"]],
                 "edit_triples": [["Q145", "P6", "Q7332"]]},
    },
]


@pytest.fixture
def mquake_dir(tmp_path):
    (tmp_path / "mquake").mkdir()
    (tmp_path / "mquake" / "MQuAKE-CF-3k-v2.json").write_text(json.dumps(CASES))
    return tmp_path


def test_loader_reads_and_checks_the_cases(mquake_dir):
    dataset = MQuAKEDataset(data_dir=mquake_dir, size=2)
    assert [r["case_id"] for r in dataset] == [2500, 17] and len(dataset) == 2
    assert dataset.source["schema"] == "mquake" and dataset.source["records_in_source"] == 3
    assert dataset.source["paths"] == [str(mquake_dir / "mquake" / "MQuAKE-CF-3k-v2.json")]
    other = mquake_dir / "elsewhere.json"
    other.write_text(json.dumps(CASES[2:]))
    assert [r["case_id"] for r in MQuAKEDataset(dataset_file=other)] == [5]


def test_requests_of_a_case_are_framework_requests():
    requests = requests_of(CASES[0])
    check_requests(requests, "test")
    assert [{key: r[key] for key in ("case_id", "prompt", "subject", "target_new", "target_true")}
            for r in requests] == [
        {"case_id": 2500, "prompt": "{} is a citizen of", "subject": "Vince McMahon",
         "target_new": {"str": "Libya", "id": "Q1016"}, "target_true": {"str": "United States of America", "id": "Q30"}},
        {"case_id": 2500, "prompt": "The capital of {} is", "subject": "Libya",
         "target_new": {"str": "Franklin", "id": "Q1778943"}, "target_true": {"str": "Tripoli", "id": "Q3579"}}]


def breakages():
    def edit(case):
        case["requested_rewrite"][1]["prompt"] = "The capital of Libya is"

    return {
        "no '{}'": (edit, r"requested_rewrite\[1\]"),
        "two questions": (lambda c: c["questions"].pop(), "questions"),
        "no new_answer": (lambda c: c.pop("new_answer"), "new_answer"),
        "no target_true": (lambda c: c["requested_rewrite"][0].pop("target_true"), "target_true"),
        "hop without question": (lambda c: c["new_single_hops"][2].pop("question"), r"new_single_hops\[2\]"),
    }


@pytest.mark.parametrize("name", list(breakages()))
def test_a_bad_case_is_one_error_naming_it(tmp_path, name):
    breaking, detail = breakages()[name]
    cases = copy.deepcopy(CASES)
    breaking(cases[0])
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases[1:2] + cases[:1]))
    with pytest.raises(InputError, match=detail) as error:
        MQuAKEDataset(dataset_file=path)
    assert f"{path} case 1 (case_id 2500)" in str(error.value)


def test_missing_files_name_every_place_looked(tmp_path):
    with pytest.raises(DatasetNotFound, match=r"mquake/MQuAKE-CF-3k-v2\.json.*editing_eval/mquake/MQuAKE-T\.json"):
        MQuAKEDataset(data_dir=tmp_path)
    with pytest.raises(DatasetNotFound, match="multihop-prompts.txt"):
        load_fewshot_prompt(tmp_path)


def test_fewshot_prompt_from_the_shared_data():
    data = shared_path("data")
    prompt = load_fewshot_prompt(data)
    lines = prompt.splitlines()
    assert lines[0] == "Q: What is the country where The Rotunda is located? A: United States of America"
    assert len(lines) == 16 and all(line.startswith("Q: ") for line in lines)
    assert mquake_prompt(prompt, "Who is X?") == prompt + "\n\nQ: Who is X? A:"


FEWSHOT = "Q: Who is the spouse of Joe Biden? A: Jill Biden\nQ: What is the capital of France? A: Paris\n"


def scripts(wrap=lambda prompt: prompt):
    def ask(question):
        return wrap(mquake_prompt(FEWSHOT, question))

    return {
        ask(CASES[0]["questions"][0]): " Washington, D.C.\nQ: Who",  # the old answer
        ask(CASES[0]["questions"][1]): " Franklin, Kentucky\nQ:",  # an alias of the new one
        ask(CASES[0]["new_single_hops"][0]["question"]): " WWE\n",
        ask(CASES[0]["new_single_hops"][3]["question"]): " Franklin\n",
        ask(CASES[1]["questions"][2]): " Paris\n",
        ask(CASES[1]["new_single_hops"][1]["question"]): " Rome\n",
        ask(CASES[2]["questions"][0]): " Marina Wheeler\n",  # answer_extended counts as the pre-edit answer
    }


def test_multihop_metrics_by_hand(embedded_tokenizer):
    tok = embedded_tokenizer
    metrics = mquake_metrics_many(ScriptedLM(tok, scripts()), tok, CASES, FEWSHOT, full_answers=True)
    first = metrics[0]["multihop_questions"]
    assert [(r["answer"], r["success"], r["success_original"]) for r in first] == [
        ("Washington, D.C.", False, True), ("Franklin, Kentucky", True, False), ("and" + " and" * 15, False, False)]
    assert [r["success"] for r in metrics[0]["new_single_hops"]] == [True, False, False, True]
    assert [mquake_case_scores(m) for m in metrics] == [
        {"multihop": 1.0, "multihop_original": 1.0, "single_hop": 0.5},
        {"multihop": 0.0, "multihop_original": 1.0, "single_hop": 0.5},
        {"multihop": 0.0, "multihop_original": 1.0, "single_hop": 0.0},
    ]
    decided = mquake_metrics_many(ScriptedLM(tok, scripts()), tok, CASES, FEWSHOT)
    assert [mquake_case_scores(m) for m in decided] == [mquake_case_scores(m) for m in metrics]


def test_chat_template_wraps_the_whole_fewshot_question(embedded_tokenizer):
    tok = embedded_tokenizer
    model = ScriptedLM(tok, scripts(lambda prompt: chat_prompt(tok, prompt)))
    metrics = mquake_metrics_many(model, tok, CASES[:1], FEWSHOT, chat_template=True)
    assert mquake_case_scores(metrics[0]) == {"multihop": 1.0, "multihop_original": 1.0, "single_hop": 0.5}
