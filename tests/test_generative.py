"""Record-level metrics beyond teacher forcing, by hand on a scripted model: G-metrics of the edit prompts,
portability/locality token accuracy, greedy success and unchanged answers, and the flat case scores."""
import pytest

from experiments.metrics.generative import (
    extended_case_scores, generation_metrics_many, portability_locality_metrics_many,
)
from tests.fake_lm import ScriptedLM, one_thread  # noqa: F401
from util.tokens import target_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def cf_record(**overrides):
    record = {
        "case_id": 3,
        "requested_rewrite": {"prompt": "{} originates from", "subject": "Spike Hughes",
                              "target_new": {"str": "Philadelphia"}, "target_true": {"str": "London"}},
        "paraphrase_prompts": ["Spike Hughes is native to", "Spike Hughes was born in"],
        "neighborhood_prompts": ["Max Mosley originates from", "Lita Ford was native to", "Aubrey de Grey is from"],
    }
    return {**record, **overrides}


CF_SCRIPTS = {
    "Spike Hughes originates from": " Philadelphia, Pennsylvania.",
    "Spike Hughes is native to": " the city of Philadelphia",  # not a prefix: the answer starts "city of"
    "Spike Hughes was born in": " Philadelphia. He",
    "Max Mosley originates from": " London. He",
    "Lita Ford was native to": " Londonderry.",  # word boundary: not London
    "Aubrey de Grey is from": " the London area",
}


def test_cf_generation_metrics_by_hand(embedded_tokenizer):
    tok = embedded_tokenizer
    metrics = generation_metrics_many(ScriptedLM(tok, CF_SCRIPTS), tok, [cf_record(), cf_record(case_id=4)], "cf",
                                      full_answers=True)
    assert metrics[0] == metrics[1] == {
        "rewrite_prompts": [{"answer": "Philadelphia, Pennsylvania.", "success": True}],
        "paraphrase_prompts": [{"answer": "the city of Philadelphia", "success": False},
                               {"answer": "Philadelphia", "success": True}],
        "neighborhood_prompts": [{"answer": "London", "success": True}, {"answer": "Londonderry.", "success": False},
                                 {"answer": "the London area", "success": True}],
    }
    assert extended_case_scores(metrics[0]) == {"GES": 1.0, "GPS": 0.5, "GNS": pytest.approx(2 / 3)}


def test_absent_groups_give_no_results_and_no_scores(embedded_tokenizer):
    tok = embedded_tokenizer
    record = cf_record()
    del record["paraphrase_prompts"], record["neighborhood_prompts"]
    metrics = generation_metrics_many(ScriptedLM(tok, CF_SCRIPTS), tok, [record], "cf")
    assert set(metrics[0]) == {"rewrite_prompts"}
    assert extended_case_scores(metrics[0]) == {"GES": 1.0}
    assert extended_case_scores({}) == {}


def test_zsre_neighborhood_questions_get_a_question_mark(embedded_tokenizer):
    tok = embedded_tokenizer
    record = {"case_id": 0,
              "requested_rewrite": {"prompt": "What university did {} attend?", "subject": "Watts Humphrey",
                                    "target_new": {"str": "University of Michigan"}},
              "paraphrase_prompts": ["What university did Watts Humphrey take part in?"],
              "neighborhood_prompts": [{"prompt": "nq question: who wrote hamlet", "target": "William Shakespeare"}]}
    model = ScriptedLM(tok, {"What university did Watts Humphrey attend?": " University of Michigan.",
                             "nq question: who wrote hamlet?": " William Shakespeare\n"})
    metrics = generation_metrics_many(model, tok, [record], "zsre")[0]
    assert [r["success"] for r in metrics["rewrite_prompts"] + metrics["neighborhood_prompts"]] == [True, True]
    assert metrics["paraphrase_prompts"][0]["success"] is False
    with pytest.raises(ValueError, match="kind"):
        generation_metrics_many(model, tok, [record], "mcf")


PORTABILITY_RECORD = {
    "case_id": 9,
    "portability_prompts": {
        "one_hop": [{"prompt": "What food is the city famous for?", "answers": ["Cheesesteaks", "cheese steak"]}],
        "reasoning": [{"prompt": "The largest city of the state is", "answers": ["New York City"]}],
    },
    "locality_prompts": {"relation_specificity": [{"prompt": "Spike Hughes is an instance of", "answers": ["human"]},
                                                  {"prompt": "Spike Hughes plays the", "answers": ["bass guitar"]}]},
}


def test_portability_and_locality_by_hand(embedded_tokenizer):
    tok = embedded_tokenizer
    scripts = {"What food is the city famous for?": " cheese steak.",
               "The largest city of the state is": " New York is big",
               "Spike Hughes is an instance of": " a human being.", "Spike Hughes plays the": ""}
    # Teacher forcing: " New York City" is 3 tokens, the model's argmax follows it for the first 2.
    new_york_city = target_token_ids(tok, "New York City")
    assert new_york_city[:2] == tok(" New York", add_special_tokens=False)["input_ids"] and len(new_york_city) == 3
    assert target_token_ids(tok, "Cheesesteaks")[0] != tok(" cheese", add_special_tokens=False)["input_ids"][0]
    model = ScriptedLM(tok, scripts)
    metrics = portability_locality_metrics_many(model, tok, [PORTABILITY_RECORD, {"case_id": 10}], generation=True,
                                                full_answers=True)
    assert metrics[1] == {}
    assert metrics[0] == {
        "portability": {"one_hop": [{"acc": 0.0, "answer": "cheese steak.", "success": True}],  # via the alias
                        "reasoning": [{"acc": pytest.approx(2 / 3), "answer": "New York is big", "success": False}]},
        "locality": {"relation_specificity": [{"acc": 0.0, "answer": "a human being.", "success": True},
                                              {"acc": 0.0, "answer": "", "success": False}]},
    }
    assert portability_locality_metrics_many(model, tok, [PORTABILITY_RECORD], generation=False)[0] == {
        "portability": {"one_hop": [{"acc": 0.0}], "reasoning": [{"acc": pytest.approx(2 / 3)}]},
        "locality": {"relation_specificity": [{"acc": 0.0}, {"acc": 0.0}]}}


def test_locality_unchanged_against_the_pre_edit_answers(embedded_tokenizer):
    tok = embedded_tokenizer
    before = ScriptedLM(tok, {"Spike Hughes is an instance of": " a human.", "Spike Hughes plays the": " bass guitar"})
    after = ScriptedLM(tok, {"Spike Hughes is an instance of": " A Human!", "Spike Hughes plays the": " bass drum",
                             "What food is the city famous for?": " cheese steak sandwiches are famous."})
    pre = portability_locality_metrics_many(before, tok, [PORTABILITY_RECORD], generation=True)
    post = portability_locality_metrics_many(after, tok, [PORTABILITY_RECORD], generation=True, pre=pre)[0]
    assert [r["unchanged"] for r in post["locality"]["relation_specificity"]] == [True, False]  # normalised equality
    assert all("unchanged" not in r for kind in post["portability"].values() for r in kind)
    # Portability answers stop once decided; locality answers are always whole (the comparison needs them).
    assert post["portability"]["one_hop"][0]["answer"] == "cheese steak sandwiches"  # "steak" ended: decided
    assert post["locality"]["relation_specificity"][1]["answer"] == "bass drum"
    scores = extended_case_scores(post)
    assert scores["locality_relation_specificity_unchanged"] == 0.5
    assert scores["locality_relation_specificity_G"] == 0.5
    assert scores["portability_one_hop_G"] == 1.0 and scores["portability_reasoning_G"] == 0.0
    assert set(scores) == {f"portability_{k}_{s}" for k in ("one_hop", "reasoning") for s in ("acc", "G")} | {
        f"locality_relation_specificity_{s}" for s in ("acc", "G", "unchanged")}
    assert all(0 <= v <= 1 for v in scores.values())


def test_pre_must_match_and_needs_generation(embedded_tokenizer):
    tok = embedded_tokenizer
    model = ScriptedLM(tok, {})
    pre = portability_locality_metrics_many(model, tok, [PORTABILITY_RECORD], generation=True)
    with pytest.raises(ValueError, match="pre needs generation"):
        portability_locality_metrics_many(model, tok, [PORTABILITY_RECORD], generation=False, pre=pre)
    pre[0]["locality"]["relation_specificity"].pop()
    with pytest.raises(ValueError, match=r"case_id 9.*'relation_specificity'"):
        portability_locality_metrics_many(model, tok, [PORTABILITY_RECORD], generation=True, pre=pre)


def test_malformed_evaluation_prompts_name_the_case(embedded_tokenizer):
    tok = embedded_tokenizer
    record = {"case_id": 5, "portability_prompts": {"one_hop": [{"prompt": "Q?", "answers": []}]}}
    with pytest.raises(ValueError, match=r"case_id 5.*'portability_prompts'"):
        portability_locality_metrics_many(ScriptedLM(tok, {}), tok, [record], generation=True)
