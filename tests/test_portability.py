"""Canonical portability/locality prompts from EasyEdit's raw fields: on every real record of
../shared/data/editing_eval, on hand-written records, and one clear error for a bad one."""
import json

import pytest

from dsets.counterfact import check_rome_record
from dsets.editing_eval import LOCALITY_KINDS, PORTABILITY_KINDS, add_evaluation_prompts, zsre_evaluation_prompts
from experiments.metrics.generative import evaluation_prompts
from tests.conftest import shared_path
from util.errors import InputError


def shared_records(name):
    return json.loads(shared_path("data", "editing_eval", name).read_text())


def check_canonical(record):
    """The shape the metrics read, and only canonical kinds."""
    assert set(evaluation_prompts(record, "portability_prompts")) <= set(PORTABILITY_KINDS)
    assert set(evaluation_prompts(record, "locality_prompts")) <= set(LOCALITY_KINDS)


def test_counterfact_one_hop_portability_on_the_real_records():
    records = shared_records("portability/counterfact_portability_gpt4.json")
    for raw in records:
        check_rome_record(raw, "test")
        record = add_evaluation_prompts(raw)
        check_canonical(record)
        assert record["portability_prompts"] == {"one_hop": [{"prompt": raw["portability"]["New Question"],
                                                              "answers": [raw["portability"]["New Answer"]]}]}
        assert "locality_prompts" not in record and "portability_prompts" not in raw  # the input is not changed
    assert add_evaluation_prompts(records[1])["portability_prompts"]["one_hop"][0] == {
        "prompt": "In which Indian state is the original language of Mariana Pineda, Tamil, an official language?",
        "answers": ["Tamil Nadu"]}


def test_counterfact_subject_replace_on_the_real_records():
    for raw in shared_records("portability/counterfact_subject_replace.json"):
        record = add_evaluation_prompts(raw)
        check_canonical(record)
        [entry] = record["portability_prompts"]["subject_replace"]
        assert entry["prompt"] == raw["requested_rewrite"]["prompt"].format(raw["alternative_subject"])
        assert entry["answers"] == [raw["requested_rewrite"]["target_new"]["str"]]
    first = shared_records("portability/counterfact_subject_replace.json")[0]
    assert add_evaluation_prompts(first)["portability_prompts"]["subject_replace"] == [
        {"prompt": "Mary Eliza Wright passed away in", "answers": ["Birmingham"]}]


def test_counterfact_distracting_neighbor_on_the_real_records():
    for raw in shared_records("locality/counterfact_distracting_neighbor.json"):
        record = add_evaluation_prompts(raw)
        check_canonical(record)
        true = raw["requested_rewrite"]["target_true"]["str"]
        assert record["locality_prompts"]["distracting_neighbor"] == [
            {"prompt": p, "answers": [true]} for p in raw["distracting_neighborhood_prompts"]]
        assert record["locality_prompts"]["relation_specificity"] == [
            {"prompt": raw["unrelated_relation"]["question"], "answers": [raw["unrelated_relation"]["object"]]}]
        assert set(record["portability_prompts"]) == {"one_hop"}  # these records carry the one-hop question too
    first = add_evaluation_prompts(shared_records("locality/counterfact_distracting_neighbor.json")[0])
    assert first["locality_prompts"]["distracting_neighbor"][0] == {
        "prompt": "Spike Hughes originates from Philadelphia. Max Mosley originates from", "answers": ["London"]}


def test_zsre_subject_replace_and_inverse_relation_on_the_real_records():
    for raw in shared_records("portability/zsre_subject_replace.json"):
        assert zsre_evaluation_prompts(raw) == {"portability_prompts": {"subject_replace": [
            {"prompt": raw["alter_subject_question"], "answers": [raw["alt"]]}]}}
    inverse = shared_records("portability/zsre_inverse_relation.json")
    for raw in inverse:
        assert zsre_evaluation_prompts(raw) == {"portability_prompts": {"inverse_relation": [
            {"prompt": raw["inverse question"], "answers": [raw["subject"]]}]}}
    assert zsre_evaluation_prompts(inverse[0])["portability_prompts"]["inverse_relation"] == [
        {"prompt": "Who is Marian Clairmont's sister?", "answers": ["Claire Clairmont"]}]


def test_zsre_one_hop_and_records_without_portability():
    raw = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
           "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
           "rephrase": "What university did Watts Humphrey take part in?",
           "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving",
           "portability": {"New Question": "In which state is the university Watts Humphrey attended?",
                           "New Answer": "Michigan"}}
    assert zsre_evaluation_prompts(raw) == {"portability_prompts": {"one_hop": [
        {"prompt": "In which state is the university Watts Humphrey attended?", "answers": ["Michigan"]}]}}
    del raw["portability"]
    assert zsre_evaluation_prompts(raw) == {}


def test_existing_canonical_prompts_are_kept():
    record = {"case_id": 1, "requested_rewrite": {"prompt": "{} plays", "subject": "A", "target_new": {"str": "jazz"},
                                                  "target_true": {"str": "rock"}},
              "portability_prompts": {"reasoning": [{"prompt": "Q", "answers": ["x"]}]}, "alternative_subject": "B"}
    assert add_evaluation_prompts(record)["portability_prompts"] == {
        "reasoning": [{"prompt": "Q", "answers": ["x"]}],
        "subject_replace": [{"prompt": "B plays", "answers": ["jazz"]}]}


@pytest.mark.parametrize("field, value, detail", [
    ("portability", {"New Question": "Where?"}, "New Answer"),
    ("portability", {"New Question": "Where?", "New Answer": ""}, "answers ''"),
    ("alternative_subject", "  ", "alternative_subject"),
    ("distracting_neighborhood_prompts", "one prompt", "distracting_neighborhood_prompts"),
    ("unrelated_relation", {"question": "What is A?"}, "object"),
])
def test_a_bad_raw_field_is_one_error_naming_the_record(field, value, detail):
    record = {"case_id": 12, "requested_rewrite": {"prompt": "{} plays", "subject": "A", "target_new": {"str": "jazz"},
                                                   "target_true": {"str": "rock"}}, field: value}
    with pytest.raises(InputError, match=detail) as error:
        add_evaluation_prompts(record, "cf.json record 4")
    assert "in cf.json record 4" in str(error.value)
    with pytest.raises(InputError, match="case_id 12"):
        add_evaluation_prompts(record)


def test_a_bad_zsre_field_names_the_record():
    with pytest.raises(InputError, match="'alt'.*zsre.json record 2"):
        zsre_evaluation_prompts({"subject": "X", "alter_subject_question": "What is Y?"}, "zsre.json record 2")
