"""KnowEdit as ROME-schema records: hand-written ZsRE records in KnowEdit's real schema (ZsRE-test-all.json is
not in ../shared), the real wiki_counterfact / wiki_recent files, where files are looked for, and bad records."""
import copy
import json

import pytest

from dsets.download import DatasetNotFound
from dsets.knowedit import KnowEditDataset
from experiments.metrics.generative import evaluation_prompts
from tests.conftest import shared_path
from util.checks import check_request
from util.errors import InputError

ZSRE = [
    {   # EasyEdit's KnowEdit README example
        "subject": "Epaspidoceras", "target_new": "Noctuidae", "prompt": "Which family does Epaspidoceras belong to?",
        "ground_truth": ["Aspidoceratidae"], "rephrase_prompt": "What family are Epaspidoceras?",
        "cond": "Geometridae >> Noctuidae || Which family does Epaspidoceras belong to?",
        "locality": {"Relation_Specificity": [
            {"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]},
            {"prompt": "Epaspidoceras taxon rank", "ground_truth": ["genus"]}]},
        "portability": {"Reasoning": [{"prompt": "What is the common name for the family Epaspidoceras belongs to?",
                                       "ground_truth": "Owlet moths"}]},
    },
    {   # the subject is not in the prompt: skipped and counted
        "subject": "Watts Humphrey", "target_new": "University of Michigan",
        "prompt": "What university did W. Humphrey attend?",
        "ground_truth": ["Illinois Institute of Technology"], "rephrase_prompt": "What university did he take part in?",
        "cond": "Illinois Institute of Technology >> University of Michigan || What university did W. Humphrey attend?",
        "locality": {"Relation_Specificity": [{"prompt": "The name of the father of Watts Humphrey is",
                                               "ground_truth": ["Watts S. Humphrey"]}]},
    },
    {
        "subject": "Leo Arons", "target_new": "Berlin", "prompt": "In which city did Leo Arons die?",
        "ground_truth": ["Vienna"], "rephrase_prompt": "Where did Leo Arons pass away?",
        "cond": "Vienna >> Berlin || In which city did Leo Arons die?",
        "locality": {"Relation_Specificity": [{"prompt": "The name of the father of Leo Arons is",
                                               "ground_truth": [["Albert Arons"]]}]},
        "portability": {"Logical_Generalization": [{"prompt": "Is Leo Arons still alive?",
                                                    "ground_truth": [["no"], ["incorrect"], ["is dead"]]}],
                        "Subject_Aliasing": [{"prompt": "In which city did Martin Leo Arons die?",
                                              "ground_truth": [["Berlin", "Berlin, Germany"]]}]},
    },
]


@pytest.fixture
def zsre_dir(tmp_path):
    (tmp_path / "knowedit").mkdir()
    (tmp_path / "knowedit" / "ZsRE-test-all.json").write_text(json.dumps(ZSRE))
    return tmp_path


def test_zsre_records_mapped_by_hand(zsre_dir):
    dataset = KnowEditDataset("zsre", data_dir=zsre_dir)
    assert dataset.source["skipped_no_template"] == 1 and dataset.source["records_in_source"] == 2
    assert dataset.source["paths"] == [str(zsre_dir / "knowedit" / "ZsRE-test-all.json")]
    assert dataset.records == [
        {"case_id": 0,
         "requested_rewrite": {"prompt": "Which family does {} belong to?", "subject": "Epaspidoceras",
                               "target_new": {"str": "Noctuidae"}, "target_true": {"str": "Aspidoceratidae"}},
         "paraphrase_prompts": ["What family are Epaspidoceras?"],
         "portability_prompts": {"reasoning": [
             {"prompt": "What is the common name for the family Epaspidoceras belongs to?",
              "answers": ["Owlet moths"]}]},
         "locality_prompts": {"relation_specificity": [
             {"prompt": "The taxon rank of Epaspidoceras is", "answers": ["genus"]},
             {"prompt": "Epaspidoceras taxon rank", "answers": ["genus"]}]}},
        {"case_id": 2,
         "requested_rewrite": {"prompt": "In which city did {} die?", "subject": "Leo Arons",
                               "target_new": {"str": "Berlin"}, "target_true": {"str": "Vienna"}},
         "paraphrase_prompts": ["Where did Leo Arons pass away?"],
         "portability_prompts": {
             "logical_generalization": [{"prompt": "Is Leo Arons still alive?",
                                         "answers": ["no", "incorrect", "is dead"]}],
             "subject_aliasing": [{"prompt": "In which city did Martin Leo Arons die?",
                                   "answers": ["Berlin", "Berlin, Germany"]}]},
         "locality_prompts": {"relation_specificity": [{"prompt": "The name of the father of Leo Arons is",
                                                        "answers": ["Albert Arons"]}]}},
    ]
    assert [r["case_id"] for r in KnowEditDataset("zsre", data_dir=zsre_dir, size=1)] == [0]


def test_dataset_file_comes_first(zsre_dir, tmp_path):
    other = tmp_path / "mine.json"
    other.write_text(json.dumps(ZSRE[2:]))
    assert [r["requested_rewrite"]["subject"] for r in KnowEditDataset("zsre", zsre_dir, dataset_file=other)] == [
        "Leo Arons"]


def test_missing_file_names_every_place_and_unknown_variant(tmp_path):
    with pytest.raises(DatasetNotFound) as error:
        KnowEditDataset("counterfact", data_dir=tmp_path)
    for place in ("knowedit/test_cf.json", "editing_eval/knowedit/train_cf.json",
                  "knowedit/wiki_counterfact_train_cf.json"):
        assert str(tmp_path / place) in str(error.value)
    with pytest.raises(InputError, match="variant 'wikibio'"):
        KnowEditDataset("wikibio", data_dir=tmp_path)


def breakages():
    return {
        "no target_new": (lambda r: r.pop("target_new"), "target_new"),
        "empty ground truth list": (lambda r: r.update(ground_truth=[]), "ground_truth"),
        "unknown kind": (lambda r: r["portability"].update(Compositionality=[]), "Compositionality"),
        "no locality answer": (lambda r: r["locality"]["Relation_Specificity"][1].pop("ground_truth"),
                               "locality.Relation_Specificity"),
        "portability not a dict": (lambda r: r.update(portability=["x"]), "portability"),
    }


@pytest.mark.parametrize("name", list(breakages()))
def test_a_bad_record_is_one_error_naming_it(tmp_path, name):
    breaking, detail = breakages()[name]
    records = copy.deepcopy(ZSRE)
    breaking(records[0])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records[2:] + records[:1]))
    with pytest.raises(InputError, match=detail) as error:
        KnowEditDataset("zsre", dataset_file=path)
    assert f"{path} record 1" in str(error.value)


def check_all(dataset):
    for record in dataset:
        check_request(record["requested_rewrite"], f"case {record['case_id']}")
        evaluation_prompts(record, "portability_prompts")
        evaluation_prompts(record, "locality_prompts")


def test_real_wiki_counterfact():
    dataset = KnowEditDataset("counterfact", data_dir=shared_path("data"))
    assert dataset.source["paths"][0].endswith("editing_eval/knowedit/wiki_counterfact_train_cf.json")
    assert dataset.source["skipped_unchanged"] == 6 and len(dataset) == 1427 - 6  # target_new == ground_truth
    check_all(dataset)
    assert dataset[0] == {
        "case_id": 0,
        "requested_rewrite": {"prompt": "The name of the country which {} is associated with is",
                              "subject": "Goursez Vreizh",
                              "target_new": {"str": "Franche-Comté"}, "target_true": {"str": "France"}},
        "portability_prompts": {
            "reasoning": [{"prompt": "The name of the capital city of the country Goursez Vreizh is associated with is",
                           "answers": ["Besançon"]}],
            "subject_aliasing": [{"prompt": "The name of the country which Gorsedd of Brittany is associated with is",
                                  "answers": ["Franche-Comté"]}]},
        "locality_prompts": {"relation_specificity": [{"prompt": "The name of the founder of Goursez Vreizh is",
                                                       "answers": ["Jean Le Fustec"]}]}}
    no_truth = [r for r in dataset if "target_true" not in r["requested_rewrite"]]
    assert [r["case_id"] for r in no_truth] == [629]  # its ground_truth is ""
    kinds = {k for r in dataset for k in r.get("locality_prompts", {})}
    assert kinds == {"relation_specificity", "forgetfulness"}


def test_real_wiki_recent():
    dataset = KnowEditDataset("recent", data_dir=shared_path("data"))
    assert len(dataset) == 570
    check_all(dataset)
    assert not any("target_true" in r["requested_rewrite"] for r in dataset)  # wiki_recent has no ground truth
    soviet = dataset[0]["locality_prompts"]["relation_specificity"][1]
    assert soviet["prompt"] == "The name of the country of citizenship of Ingrīda Amantova is"
    assert soviet["answers"][:3] == ["Soviet Union", "USSR", "U.S.S.R."] and len(soviet["answers"]) == 13
