"""Dataset loaders: EasyEdit -> ROME mapping, source preference, zsRE mapping, lookup errors, tf-idf, snippets."""
import json
import math

import numpy as np
import pytest

from dsets import (AttributeSnippets, CounterFactDataset, DatasetNotFound, KnownsDataset, MENDQADataset,
                   get_tfidf_vectorizer, load_records, locate)
from dsets.counterfact import read_rome_files
from tests.conftest import shared_path


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """No test may touch the network; the download tests use file:// URLs and re-enable downloads."""
    monkeypatch.setenv("KE_NO_DOWNLOAD", "1")


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def easyedit(case_id, subject, prompt, new, true, rephrase="R", locality="L"):
    return {"case_id": case_id, "prompt": prompt, "subject": subject, "target_new": new, "ground_truth": true,
            "rephrase_prompt": rephrase, "locality_prompt": locality, "locality_ground_truth": true}


def rome(case_id, template, subject, new="N", true="T"):
    return {"case_id": case_id,
            "requested_rewrite": {"prompt": template, "relation_id": "P1", "subject": subject,
                                  "target_new": {"str": new, "id": "Q1"}, "target_true": {"str": true, "id": "Q2"}},
            "paraphrase_prompts": ["p1", "p2"], "neighborhood_prompts": ["n1"],
            "attribute_prompts": ["a1"], "generation_prompts": ["g1"]}


def write_easyedit_set(data_dir):
    """Three files, case_ids interleaved; case 3's subject is not in its prompt, case 5's prompt has braces."""
    folder = data_dir / "counterfact_easyedit"
    write_json(folder / "counterfact-edit.json", [easyedit(2, "Paris", "Paris is the capital of", "Italy", "France"),
                                                  easyedit(0, "Ada", "The job of Ada is", "cook", "mathematician",
                                                           rephrase="Ada works as a", locality="Bob's job is")])
    write_json(folder / "counterfact-train.json", [easyedit(3, "Rome", "Milan is in", "Spain", "Italy"),
                                                   easyedit(5, "Set", "Set {x} is", "odd", "even"),
                                                   easyedit(4, "Bo", "Bo met Bo in", "Oslo", "Rome")])
    write_json(folder / "counterfact-val.json", [easyedit(1, "Nile", "The river Nile flows in", "Peru", "Egypt")])


def test_easyedit_mapping_on_hand_made_files(tmp_path):
    write_easyedit_set(tmp_path)
    ds = CounterFactDataset(tmp_path)
    assert [r["case_id"] for r in ds] == [0, 1, 2, 4]  # sorted union; cases 3 and 5 skipped
    assert ds.source["schema"] == "easyedit" and ds.source["skipped_no_template"] == 2
    assert len(ds.source["paths"]) == 3
    assert ds[0] == {
        "case_id": 0,
        "requested_rewrite": {"prompt": "The job of {} is", "subject": "Ada",
                              "target_new": {"str": "cook"}, "target_true": {"str": "mathematician"}},
        "paraphrase_prompts": ["Ada works as a"],
        "neighborhood_prompts": ["Bob's job is"],
    }
    assert ds[2]["requested_rewrite"]["prompt"] == "{} is the capital of"
    assert ds[3]["requested_rewrite"]["prompt"] == "{} met Bo in"  # one placeholder, filling it gives the prompt


def test_easyedit_real_files_cover_every_case():
    data_dir = shared_path("data")
    shared_path("data", "counterfact_easyedit")
    ds = CounterFactDataset(data_dir)
    assert ds.source["schema"] == "easyedit" and ds.source["skipped_no_template"] == 0
    assert [r["case_id"] for r in ds] == list(range(21919))
    rewrite = ds[0]["requested_rewrite"]  # README: case 0 is Danielle Darrieux, French -> English
    assert rewrite["subject"] == "Danielle Darrieux"
    assert (rewrite["target_true"]["str"], rewrite["target_new"]["str"]) == ("French", "English")
    assert rewrite["prompt"].format(rewrite["subject"]) == "The mother tongue of Danielle Darrieux is"
    assert all(r["requested_rewrite"]["prompt"].count("{}") == 1 for r in ds)
    assert not any("relation_id" in r["requested_rewrite"] or "attribute_prompts" in r for r in ds)


def test_easyedit_mapping_agrees_with_rome_subset():
    data_dir = shared_path("data")
    subset = read_rome_files(sorted(shared_path("data", "counterfact_rome").glob("*.json")))
    mapped = {r["case_id"]: r for r in CounterFactDataset(data_dir)}
    assert len(subset) == 2191
    for original in subset:
        ours = mapped[original["case_id"]]
        want, got = original["requested_rewrite"], ours["requested_rewrite"]
        assert got["subject"] == want["subject"]
        assert got["prompt"].format(got["subject"]) == want["prompt"].format(want["subject"])
        assert got["target_new"]["str"] == want["target_new"]["str"]
        assert got["target_true"]["str"] == want["target_true"]["str"]
        assert ours["neighborhood_prompts"][0] in original["neighborhood_prompts"]


def test_source_preference_full_then_easyedit_then_subset(tmp_path):
    write_json(tmp_path / "counterfact_rome" / "part.json", [rome(7, "{} plays", "Sub")])
    assert CounterFactDataset(tmp_path).source == {
        "schema": "rome", "paths": [str(tmp_path / "counterfact_rome" / "part.json")], "subset": True,
        "note": "ROME-schema subset, not the full 21,919 cases", "records_in_source": 1}
    write_easyedit_set(tmp_path)
    assert CounterFactDataset(tmp_path).source["schema"] == "easyedit"
    write_json(tmp_path / "counterfact.json", [rome(5, "{} is", "Full")])
    full = CounterFactDataset(tmp_path)
    assert full.source == {"schema": "rome", "paths": [str(tmp_path / "counterfact.json")], "subset": False,
                           "records_in_source": 1}
    assert full[0]["requested_rewrite"]["subject"] == "Full" and full[0]["attribute_prompts"] == ["a1"]


def test_rome_subset_files_are_merged_sorted(tmp_path):
    write_json(tmp_path / "counterfact_rome" / "a.json", [rome(9, "{} a", "A")])
    write_json(tmp_path / "counterfact_rome" / "b.json", [rome(4, "{} b", "B")])
    assert [r["case_id"] for r in CounterFactDataset(tmp_path)] == [4, 9]
    write_json(tmp_path / "counterfact_rome" / "c.json", [rome(4, "{} c", "C")])
    with pytest.raises(ValueError, match="case_id 4 appears twice"):
        CounterFactDataset(tmp_path)


def test_size_limit_takes_first_records(tmp_path):
    write_json(tmp_path / "counterfact.json", [rome(i, "{} x", f"S{i}") for i in range(5)])
    assert [r["case_id"] for r in CounterFactDataset(tmp_path, size=2)] == [0, 1]
    assert len(CounterFactDataset(tmp_path, size=50)) == 5
    assert CounterFactDataset(tmp_path, size=2).source["records_in_source"] == 5
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="size"):
            CounterFactDataset(tmp_path, size=bad)


def test_bad_rome_record_names_file_and_problem(tmp_path):
    write_json(tmp_path / "counterfact.json", [rome(0, "no placeholder", "S")])
    with pytest.raises(ValueError, match=r"template containing .* in \S*counterfact\.json record 0: "):
        CounterFactDataset(tmp_path)
    (tmp_path / "counterfact.json").write_text('[{"case_id": 0,')
    with pytest.raises(ValueError, match=r"invalid JSON .* in \S*counterfact\.json: .*delete it"):
        CounterFactDataset(tmp_path)


def mend(subject, src, answers, rephrase="reph", loc="nq question: who", loc_ans="Al"):
    return {"subject": subject, "src": src, "pred": "x", "rephrase": rephrase, "alt": "alt", "answers": answers,
            "loc": loc, "loc_ans": loc_ans, "cond": "c"}


def test_zsre_mapping_on_hand_made_file(tmp_path):
    write_json(tmp_path / "zsre_subset" / "zsre_mend_train-1k.json",
               [mend("Oslo", "Which country is Oslo in?", ["Norway", "NO"], rephrase="Oslo lies in which country?",
                     loc="nq question: who wrote hamlet", loc_ans="Shakespeare"),
                mend("Bergen", "Which river flows through Oslo?", ["Akerselva"]),
                mend("Tromso", "What is Tromso known for?", ["aurora"])])
    ds = MENDQADataset(tmp_path)
    assert ds.source["subset"] is True and ds.source["schema"] == "mend" and ds.source["skipped_no_template"] == 1
    assert ds[0] == {
        "case_id": 0,
        "requested_rewrite": {"prompt": "Which country is {} in?", "subject": "Oslo", "target_new": {"str": "Norway"}},
        "paraphrase_prompts": ["Oslo lies in which country?"],
        "neighborhood_prompts": [{"prompt": "nq question: who wrote hamlet", "target": "Shakespeare"}],
    }
    assert ds[1]["case_id"] == 2  # case_id = position in the file, kept across the skipped record
    assert "target_true" not in ds[1]["requested_rewrite"]
    assert len(MENDQADataset(tmp_path, size=1)) == 1


def test_zsre_eval_set_preferred_over_subset(tmp_path):
    write_json(tmp_path / "zsre_subset" / "zsre_mend_train-1k.json", [mend("A", "Is A here?", ["yes"])])
    write_json(tmp_path / "zsre_mem.json", [mend("B", "Is B here?", ["no"])])
    alias = MENDQADataset(tmp_path)
    assert alias.source["subset"] is False and alias[0]["requested_rewrite"]["subject"] == "B"
    write_json(tmp_path / "zsre_mend_eval.json", [mend("C", "Is C here?", ["no"])])
    assert MENDQADataset(tmp_path)[0]["requested_rewrite"]["subject"] == "C"


def test_zsre_real_subset():
    ds = MENDQADataset(shared_path("data"))
    assert len(ds) == 1000 and ds.source["subset"] is True
    assert ds[0]["requested_rewrite"]["prompt"].format("UniFirst") == "What is the product made by UniFirst?"
    assert ds[0]["requested_rewrite"]["target_new"]["str"] == "uniform"


def test_missing_files_error_names_every_place_and_the_url(tmp_path):
    with pytest.raises(DatasetNotFound) as cf:
        load_records("cf", tmp_path)
    message = str(cf.value)
    for place in ("counterfact.json", "counterfact_easyedit/counterfact-edit.json",
                  "counterfact_easyedit/counterfact-val.json", "counterfact_rome/*.json"):
        assert str(tmp_path / place) in message
    assert "https://memit.baulab.info/data/dsets/counterfact.json" in message
    assert "KE_DATA_DIR" in message and "--data_dir" in message
    assert isinstance(cf.value, FileNotFoundError)
    with pytest.raises(DatasetNotFound) as zsre:
        load_records("zsre", tmp_path)
    for place in ("zsre_mend_eval.json", "zsre_mem.json", "zsre_subset/zsre_mend_train-1k.json"):
        assert str(tmp_path / place) in str(zsre.value)
    assert not any(tmp_path.iterdir())  # nothing was downloaded or created


def test_dataset_names_match_exactly(tmp_path):
    write_json(tmp_path / "counterfact.json", [rome(0, "{} cf", "single")])
    write_json(tmp_path / "multi_counterfact.json", [rome(0, "{} mcf", "multi")])
    assert load_records("cf", tmp_path)[0]["requested_rewrite"]["subject"] == "single"
    assert load_records("mcf", tmp_path)[0]["requested_rewrite"]["subject"] == "multi"
    (tmp_path / "multi_counterfact.json").unlink()
    with pytest.raises(DatasetNotFound, match="multi_counterfact.json"):
        load_records("mcf", tmp_path)  # never falls back to the single-edit file
    for bad in ("c", "CF", "mcf ", "counterfact"):
        with pytest.raises(ValueError, match="valid names: cf, knowedit_counterfact, knowedit_recent, knowedit_zsre, "
                                             "mcf, mquake, zsre"):
            load_records(bad, tmp_path)


def test_download_is_atomic_and_can_be_disabled(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    write_json(remote / "data" / "dsets" / "known_1000.json", [{"known_id": 0}])
    monkeypatch.setenv("KE_REMOTE_ROOT_URL", remote.as_uri())
    local = tmp_path / "local"
    with pytest.raises(DatasetNotFound, match="not tried"):
        locate("known_1000.json", local, "data/dsets/known_1000.json")
    assert not local.exists()
    monkeypatch.setenv("KE_NO_DOWNLOAD", "0")
    path = locate("known_1000.json", local, "data/dsets/known_1000.json")
    assert path == local / "known_1000.json" and json.loads(path.read_text()) == [{"known_id": 0}]
    assert [p.name for p in local.iterdir()] == ["known_1000.json"]  # no temporary file left behind
    with pytest.raises(DatasetNotFound, match=r"Downloading file://.*/data/dsets/idf\.npy failed"):
        locate("idf.npy", local, "data/dsets/idf.npy")
    assert [p.name for p in local.iterdir()] == ["known_1000.json"]
    monkeypatch.setenv("KE_NO_DOWNLOAD", "maybe")
    with pytest.raises(ValueError, match="KE_NO_DOWNLOAD"):
        locate("idf.npy", local, "data/dsets/idf.npy")


def test_tfidf_vectorizer_matches_hand_computation(tmp_path):
    write_json(tmp_path / "tfidf_vocab.json", {"apple": 0, "banana": 1, "cherry": 2})
    np.save(tmp_path / "idf.npy", np.array([1.0, 3.0, 2.0]))
    vec = get_tfidf_vectorizer(tmp_path)
    # counts (2, 1, 0) x idf (1, 3, 2) = (2, 3, 0), then l2-normalised; unknown words and case are ignored
    got = vec.transform(["Apple apple banana durian", "cherry banana"]).toarray()
    np.testing.assert_allclose(got[0], np.array([2.0, 3.0, 0.0]) / math.sqrt(13))
    np.testing.assert_allclose(got[1], np.array([0.0, 3.0, 2.0]) / math.sqrt(13))


def test_tfidf_files_are_checked(tmp_path):
    write_json(tmp_path / "tfidf_vocab.json", {"apple": 0, "banana": 2})
    np.save(tmp_path / "idf.npy", np.array([1.0, 3.0]))
    with pytest.raises(ValueError, match="exactly 0..1"):
        get_tfidf_vectorizer(tmp_path)
    write_json(tmp_path / "tfidf_vocab.json", {"apple": 0, "banana": 1})
    np.save(tmp_path / "idf.npy", np.array([1.0, 3.0, 2.0]))
    with pytest.raises(ValueError, match=r"idf\.npy: expected a 1-D float array of 2"):
        get_tfidf_vectorizer(tmp_path)


def test_attribute_snippets_lookup(tmp_path):
    ada = {"name": "Ada Lovelace", "text": "Ada was a mathematician."}
    alan = {"name": "Alan Turing", "text": "Alan was a mathematician."}
    write_json(tmp_path / "attribute_snippets.json", [
        {"relation_id": "P106", "target_id": "Q170790", "samples": [ada]},
        {"relation_id": "P106", "target_id": "Q33999", "samples": [{"name": "X", "text": "X acts."}]},
        {"relation_id": "P106", "target_id": "Q170790", "samples": [alan]},
    ])
    snips = AttributeSnippets(tmp_path)
    assert snips.samples("P106", "Q170790") == [ada, alan]
    assert snips.samples("P106", "Q1") == [] and snips.samples("P27", "Q170790") == []
    write_json(tmp_path / "attribute_snippets.json", [{"relation_id": "P106", "samples": []}])
    with pytest.raises(ValueError, match="entry 0: expected keys relation_id, target_id, samples"):
        AttributeSnippets(tmp_path)


def test_knowns_real_file():
    knowns = KnownsDataset(shared_path("data"))
    assert len(knowns) == 1209  # README: 1,209 records
    assert knowns[0]["subject"] == "Vinson Massif" and knowns[0]["template"].format("X") == "X is located in the continent"
