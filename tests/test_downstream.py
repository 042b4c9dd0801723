"""Downstream model-health checks (SPEC §9): metrics by hand, the label-likelihood scorer on fake models with
known logits, perplexity by hand, the rebuilt reference subsets against the raw files, missing data."""
import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch

from experiments.metrics import downstream as ds
from tests.conftest import make_tiny_model, shared_path
from util.errors import InputError
from util.tokens import prompt_token_ids, target_token_ids

# ----------------------------------------------------------------------------------------------------
# Metrics, worked by hand


def test_binary_metrics_by_hand():
    gold = [1, 1, 1, 0, 0, 0]
    pred = [1, 1, 0, 0, 0, 1]
    # 4 of 6 right.
    assert ds.accuracy(pred, gold) == pytest.approx(4 / 6)
    # class 1: tp 2, fp 1, fn 1 -> F1 = 2·2/(2·2+1+1) = 2/3; class 0 likewise 2/3; mean 2/3.
    assert ds.macro_f1(pred, gold, 2) == pytest.approx(2 / 3)
    # TP 2, TN 2, FP 1, FN 1: (2·2 − 1·1)/sqrt(3·3·3·3) = 3/9 = 1/3.
    assert ds.matthews_corrcoef(pred, gold, 2) == pytest.approx(1 / 3)


def test_three_class_metrics_by_hand():
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    assert ds.accuracy(pred, gold) == pytest.approx(4 / 6)
    # class 0: tp 1, fp 1, fn 1 -> 2/4 = 0.5; class 1: tp 2, fp 1, fn 0 -> 4/5; class 2: tp 1, fp 0, fn 1 -> 2/3.
    assert ds.macro_f1(pred, gold, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # s = 6, c = 4, t = (2, 2, 2), p = (2, 3, 1): (4·6 − (4 + 6 + 2)) / sqrt((36 − 14)(36 − 12)) = 12/sqrt(528).
    assert ds.matthews_corrcoef(pred, gold, 3) == pytest.approx(12 / math.sqrt(528))


def test_degenerate_one_class_metrics():
    # All gold and all predictions in class 1: every answer right, but MCC's denominator is 0 -> 0.
    assert ds.accuracy([1, 1, 1], [1, 1, 1]) == 1.0
    assert ds.macro_f1([1, 1, 1], [1, 1, 1], 2) == 1.0  # class 0 neither present nor predicted: left out
    assert ds.matthews_corrcoef([1, 1, 1], [1, 1, 1], 2) == 0.0
    # Always predicting 1 on balanced gold: acc 1/2; F1 class 1 = 4/6, class 0 = 0 -> 1/3; MCC 0.
    gold, pred = [1, 0, 1, 0], [1, 1, 1, 1]
    assert ds.accuracy(pred, gold) == 0.5
    assert ds.macro_f1(pred, gold, 2) == pytest.approx(1 / 3)
    assert ds.matthews_corrcoef(pred, gold, 2) == 0.0
    # Perfect and perfectly wrong binary predictions: MCC +1 and −1.
    assert ds.matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1], 2) == pytest.approx(1.0)
    assert ds.matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1], 2) == pytest.approx(-1.0)


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError):
        ds.accuracy([0, 1], [0])
    with pytest.raises(ValueError):
        ds.macro_f1([0, 2], [0, 1], 2)


# ----------------------------------------------------------------------------------------------------
# Scorer on a fake model whose logits at each position depend only on that position's token


class RuleModel(torch.nn.Module):
    """logits[b, s, favored] = value for each rule (trigger, favored, value) with input_ids[b, s] == trigger; else 0."""

    def __init__(self, vocab_size, rules):
        super().__init__()
        self.vocab_size = vocab_size
        self.rules = rules
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the scorer a device
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.calls += 1
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for trigger, favored, value in self.rules:
            logits[..., favored] += value * (input_ids == trigger).float()
        return SimpleNamespace(logits=logits)


def one_token(tok, word):
    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (word, ids)
    return ids[0]


def log_prob(value, favored_values, vocab_size):
    """log p of a token with logit `value` when the other favored tokens have `favored_values`, the rest 0."""
    others = vocab_size - 1 - len(favored_values)
    return value - math.log(math.exp(value) + sum(math.exp(v) for v in favored_values) + others)


def make_task(items, labels, few_shot_prompt=""):
    return ds.DownstreamTask(name="fake", template="{x}", labels=labels, few_shot_prompt=few_shot_prompt,
                             items=items, source={"k": 0})


def test_single_token_scorer_and_item_order(embedded_tokenizer):
    tok = embedded_tokenizer
    V = len(tok)
    yes, no = one_token(tok, "yes"), one_token(tok, "no")
    apple, banana = one_token(tok, "apple"), one_token(tok, "banana")
    model = RuleModel(V, [(apple, yes, 3.0), (banana, no, 2.0)])
    # Different lengths in mixed order, so sorting by length reorders them inside the scorer.
    items = [("a long sentence that talks a lot and ends with apple", 1),
             ("one banana", 0),
             ("short apple", 1),
             ("a medium sentence ending in banana", 0),
             ("an apple", 0)]
    for prompt, _ in items:  # the trigger really is each item's last token
        assert tok(prompt, add_special_tokens=False)["input_ids"][-1] in (apple, banana)
    task = make_task(items, ["no", "yes"])
    scores = ds.label_log_likelihoods(model, tok, task, batch_size=2)
    for (prompt, _), (s_no, s_yes) in zip(items, scores):
        if prompt.endswith("apple"):
            assert s_yes == pytest.approx(log_prob(3.0, [], V), abs=1e-4)
            assert s_no == pytest.approx(log_prob(0.0, [3.0], V), abs=1e-4)
        else:
            assert s_no == pytest.approx(log_prob(2.0, [], V), abs=1e-4)
            assert s_yes == pytest.approx(log_prob(0.0, [2.0], V), abs=1e-4)
    model.calls = 0
    result = ds.evaluate_downstream(model, tok, [task], batch_size=2)["fake"]
    assert model.calls == 3  # one forward per batch of items: ceil(5 / 2), single-token labels need no more
    assert result["predictions"] == [1, 0, 1, 0, 1]  # original item order
    assert result["gold"] == [1, 0, 1, 0, 0]
    assert result["accuracy"] == pytest.approx(4 / 5)
    assert result["n"] == 5 and result["labels"] == ["no", "yes"]


def test_multi_token_labels_are_teacher_forced(embedded_tokenizer):
    tok = embedded_tokenizer
    V = len(tok)
    big, cat, small, dog = (one_token(tok, w) for w in ("big", "cat", "small", "dog"))
    apple, banana = one_token(tok, "apple"), one_token(tok, "banana")
    assert target_token_ids(tok, "big cat") == [big, cat] and target_token_ids(tok, "small dog") == [small, dog]
    # After "apple" the first label token " big" is likelier, but " dog" after " small" wins overall:
    # a scorer that looked only at the first label token would pick "big cat".
    model = RuleModel(V, [(apple, big, 2.0), (apple, small, 1.0), (small, dog, 5.0), (banana, big, 8.0)])
    items = [("we ate an apple", 1), ("a banana", 0), ("some apple", 0)]
    task = make_task(items, ["big cat", "small dog"])
    scores = ds.label_log_likelihoods(model, tok, task, batch_size=2)
    apple_big = log_prob(2.0, [1.0], V) + log_prob(0.0, [], V)      # big | apple, then cat | big (no rule)
    apple_small = log_prob(1.0, [2.0], V) + log_prob(5.0, [], V)    # small | apple, then dog | small
    banana_big = log_prob(8.0, [], V) + log_prob(0.0, [], V)
    banana_small = log_prob(0.0, [8.0], V) + log_prob(5.0, [], V)
    expected = [[apple_big, apple_small], [banana_big, banana_small], [apple_big, apple_small]]
    for got, want in zip(scores, expected):
        assert got == pytest.approx(want, abs=1e-4)
    result = ds.evaluate_downstream(model, tok, [task], batch_size=2)["fake"]
    assert result["predictions"] == [1, 0, 1]


def test_few_shot_prefix_is_prepended_without_cache(embedded_tokenizer):
    # The fake model has no key/value cache: the prefix goes into every row, and the label scores must be
    # read after it. A read that forgot the prefix would land on the prefix's " apple" for "x pear".
    tok = embedded_tokenizer
    V = len(tok)
    yes, apple = one_token(tok, "yes"), one_token(tok, "apple")
    prefix = "Say apple\n\n"
    assert prompt_token_ids(tok, prefix)[1] == apple
    model = RuleModel(V, [(apple, yes, 4.0)])
    task = make_task([("x pear", 0), ("one apple", 1)], ["no", "yes"], few_shot_prompt=prefix)
    scores = ds.label_log_likelihoods(model, tok, task)
    assert scores[0][0] == scores[0][1]  # no rule after " pear": a tie, broken towards class 0
    assert scores[1][1] == pytest.approx(log_prob(4.0, [], V), abs=1e-4)
    assert ds.evaluate_downstream(model, tok, [task])["fake"]["predictions"] == [0, 1]


# ----------------------------------------------------------------------------------------------------
# Perplexity by hand


class FixedDistributionModel(torch.nn.Module):
    """The same logits at every position, whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.fixed = torch.nn.Parameter(torch.as_tensor(logits, dtype=torch.float32), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.fixed.expand(*input_ids.shape, -1).clone())


def test_perplexity_uniform_is_vocab_size():
    tok = SimpleNamespace(pad_token_id=0)
    model = FixedDistributionModel(torch.zeros(7))
    assert ds.perplexity(model, tok, [[1, 2, 3, 4], [5, 6, 0, 1, 2]], batch_size=1) == pytest.approx(7.0)


def test_perplexity_known_distribution_and_padding():
    tok = SimpleNamespace(pad_token_id=3)
    model = FixedDistributionModel(torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125])))
    # Chunk 1 predicts 1, 2, 3, 0: NLL log 4 + log 8 + log 8 + log 2 = log 512.
    # Chunk 2 (shorter, padded with token 3 in a batch) predicts 0: NLL log 2.
    # exp(log 1024 / 5) = 1024^(1/5) = 4.  Padding counted as tokens would change it.
    chunks = [[0, 1, 2, 3, 0], [1, 0]]
    assert ds.perplexity(model, tok, chunks, batch_size=2) == pytest.approx(4.0)
    assert ds.perplexity(model, tok, chunks, batch_size=1) == pytest.approx(4.0)
    assert ds.perplexity(model, tok, chunks[:1]) == pytest.approx(512 ** 0.25)


def test_perplexity_chunks_from_shared_wikitext(embedded_tokenizer):
    data_dir = shared_path("data")
    shared_path("data", "wikitext-2-raw", "wiki.test.raw")
    chunks, source = ds.load_perplexity_chunks([data_dir], embedded_tokenizer, n_chunks=3, chunk_tokens=50)
    assert [len(c) for c in chunks] == [50, 50, 50]
    text = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    whole = embedded_tokenizer(text[:5000], add_special_tokens=False)["input_ids"]
    assert chunks[0] + chunks[1] + chunks[2] == whole[:150]  # consecutive, non-overlapping, from the start
    assert source["file"].endswith("wiki.test.raw")


def test_perplexity_chunks_missing(tmp_path, embedded_tokenizer):
    with pytest.raises(ds.DownstreamDataMissing) as info:
        ds.load_perplexity_chunks([tmp_path], embedded_tokenizer)
    assert str(tmp_path / "wikitext-2-raw" / "wiki.test.raw") in str(info.value)


# ----------------------------------------------------------------------------------------------------
# Loading the reference subsets from ../shared/data


def shared_subsets():
    path = shared_path("data", "downstream", "editing_subsets", "subset_membership.json")
    return json.loads(path.read_text(encoding="utf-8"))


def read_tsv(path, encoding="utf-8"):
    with open(path, encoding=encoding, newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_sst2_subset_rows():
    data = shared_path("data")
    order = shared_subsets()["ume_sst2"]["target_rows_in_pickle_order"]
    assert order[0] == 427
    rows = read_tsv(data / "downstream" / "sst2" / "dev.tsv")[1:]  # header excluded
    (task,) = ds.load_downstream_tasks([data], ["sst2"], [0], 5)
    assert len(task.items) == 5 and task.few_shot_prompt == ""
    prompt, gold = task.items[0]
    assert prompt == f"Review: {rows[427][0].strip()}\nSentiment:"
    assert gold == int(rows[427][1])
    (task,) = ds.load_downstream_tasks([data], ["sst2"], [2], 3)
    # Few-shot: rows 427 and 190 with their answers; the items start at subset position 2.
    for row in order[:2]:
        answer = task.labels[int(rows[row][1])]
        assert f"Review: {rows[row][0].strip()}\nSentiment: {answer}\n\n" in task.few_shot_prompt
    assert task.items[0] == (f"Review: {rows[order[2]][0].strip()}\nSentiment:", int(rows[order[2]][1]))
    assert len(task.items) == 3 and task.source["k"] == 2 and task.source["n"] == 3
    assert task.labels == ["negative", "positive"]


def test_cola_row_from_out_of_domain_file():
    data = shared_path("data")
    order = shared_subsets()["ume_cola"]["target_rows_in_pickle_order"]
    assert order[0] == 902
    ood = read_tsv(data / "downstream" / "cola" / "out_of_domain_dev.tsv")
    (task,) = ds.load_downstream_tasks([data], ["cola"], [0], 2)
    prompt, gold = task.items[0]
    assert ood[902 - 527][3].strip() in prompt and prompt.startswith("Sentence: ")
    assert gold == int(ood[902 - 527][1])
    ind = read_tsv(data / "downstream" / "cola" / "in_domain_dev.tsv")
    assert order[1] < 527 and ind[order[1]][3].strip() in task.items[1][0]


def test_mrpc_bom_and_labels():
    data = shared_path("data")
    order = shared_subsets()["ume_mrpc"]["target_rows_in_pickle_order"]
    rows = read_tsv(data / "downstream" / "mrpc" / "dev.tsv", encoding="utf-8-sig")[1:]
    (task,) = ds.load_downstream_tasks([data], ["mrpc"], [1], 4)
    for (prompt, gold), row in zip(task.items, order[1:5]):
        assert gold == int(rows[row][0])
        assert rows[row][3].strip() in prompt and rows[row][4].strip() in prompt
    assert task.labels[1] == "yes"  # 1 = paraphrase
    assert task.few_shot_prompt.endswith(f"Answer: {task.labels[int(rows[order[0]][0])]}\n\n")


def test_rte_and_nli_label_mapping():
    import pyarrow.parquet as pq

    data = shared_path("data")
    subsets = shared_subsets()
    rte, nli = ds.load_downstream_tasks([data], ["rte", "nli"], [0, 0], 6)
    for task, key, name in ((rte, "ume_rte", "validation"), (nli, "ume_nli(=RTE train)", "train")):
        table = pq.read_table(data / "downstream" / "rte" / f"{name}.parquet").to_pylist()
        for (prompt, gold), row in zip(task.items, subsets[key]["target_rows_in_pickle_order"]):
            assert table[row]["sentence1"].strip() in prompt and table[row]["sentence2"].strip() in prompt
            # label 0 = entailment must be verbalised "yes".
            assert (task.labels[gold] == "yes") == (table[row]["label"] == 0)
        assert {g for _, g in task.items} == {0, 1}


def test_mmlu_rows_and_header():
    data = shared_path("data")
    order = shared_subsets()["ume_mmlu(=MMLU validation, balanced)"]["target_rows_in_pickle_order"]
    lines = (data / "downstream" / "mmlu" / "val" / "zero_shot_mmlu_val.json").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    (task,) = ds.load_downstream_tasks([data], ["mmlu"], [2], 3)
    question = records[order[2]]["input"].split("\n\n", 1)[1]
    assert task.items[0] == (question, "ABCD".index(records[order[2]]["output"]))
    assert task.few_shot_prompt.startswith(ds.MMLU_HEADER)
    assert task.few_shot_prompt.count("The following are multiple choice") == 1  # per-example headers dropped
    for row in order[:2]:
        example = records[row]["input"].split("\n\n", 1)[1]
        assert f"{example} {records[row]['output']}\n\n" in task.few_shot_prompt
    assert task.labels == ["A", "B", "C", "D"]


def test_subset_too_small_and_bad_requests():
    data = shared_path("data")
    with pytest.raises(ValueError, match="258"):
        ds.load_downstream_tasks([data], ["mrpc"], [4], 255)
    ds.load_downstream_tasks([data], ["mrpc"], [4], 254)  # exactly fits


def test_bad_requests_fail_before_reading(tmp_path):
    """The project's one error type, one line naming the flag and the fix."""
    with pytest.raises(InputError, match=r"'qnli'\] in --downstream_tasks: valid tasks: sst2, mrpc, cola, rte, nli, mmlu"):
        ds.load_downstream_tasks([tmp_path], ["sst2", "qnli"], [4, 4], 10)
    with pytest.raises(InputError, match="2 downstream tasks but 1 few-shot counts in --number_of_few_shots"):
        ds.load_downstream_tasks([tmp_path], ["sst2", "mrpc"], [4], 10)
    with pytest.raises(InputError, match="number of tests is 0 in --number_of_tests"):
        ds.load_downstream_tasks([tmp_path], ["sst2"], [4], 0)
    bad = tmp_path / "downstream"
    (bad / "sst2").mkdir(parents=True)
    (bad / "sst2" / "dev.tsv").write_text("review\tscore\nfine\t1\n")
    (bad / ds.SUBSETS_FILE).parent.mkdir(parents=True, exist_ok=True)
    (bad / ds.SUBSETS_FILE).write_text(json.dumps({ds.SUBSET_KEYS["sst2"]: {"target_rows_in_pickle_order": [0, 0]}}))
    with pytest.raises(InputError, match=r"unexpected header \['review', 'score'\] in .*sst2/dev.tsv"):
        ds.load_downstream_tasks([tmp_path], ["sst2"], [1], 1)


def test_missing_file_names_task_and_paths(tmp_path):
    other = tmp_path / "other"
    with pytest.raises(ds.DownstreamDataMissing) as info:
        ds.load_downstream_tasks([tmp_path, other], ["cola"], [0], 1)
    message = str(info.value)
    assert "'cola'" in message
    assert str(tmp_path / "downstream" / "cola" / "in_domain_dev.tsv") in message
    assert str(other / "downstream" / "cola" / "out_of_domain_dev.tsv") in message
    assert "--data_dir" in message and "KE_DATA_DIR" in message
    assert isinstance(info.value, FileNotFoundError)


# ----------------------------------------------------------------------------------------------------
# End to end on a tiny random model, against a naive one-item-at-a-time teacher-forced loop


def write_tiny_downstream(root):
    """A synthetic downstream/ folder with short sst2 and cola rows (the tiny models have 128 positions)."""
    down = root / "downstream"
    (down / "sst2").mkdir(parents=True)
    (down / "cola").mkdir()
    (down / "editing_subsets").mkdir()
    (down / "sst2" / "dev.tsv").write_text(
        "text\tlabel\ngreat fun \t1\ndull and slow \t0\na \"quoted\" joy\t1\nbad\t0\nfine film\t1\n", encoding="utf-8")
    (down / "cola" / "in_domain_dev.tsv").write_text(
        "a1\t1\t\tThe cat sat.\na1\t0\t*\tCat the sat.\n", encoding="utf-8")
    (down / "cola" / "out_of_domain_dev.tsv").write_text(
        "b2\t1\t\tDogs bark loudly.\nb2\t0\t*\tBark dogs the.\n", encoding="utf-8")
    subsets = {"ume_sst2": {"target_rows_in_pickle_order": [4, 2, 0, 1, 3]},
               "ume_cola": {"target_rows_in_pickle_order": [1, 3, 0, 2]}}
    (down / "editing_subsets" / "subset_membership.json").write_text(json.dumps(subsets), encoding="utf-8")


def naive_log_likelihoods(model, tok, task):
    """One (item, label) at a time: the whole sequence through the model, label token log-probs summed."""
    prefix = prompt_token_ids(tok, task.few_shot_prompt) if task.few_shot_prompt else prompt_token_ids(tok, "")
    out = []
    for prompt, _ in task.items:
        item = tok(prompt, add_special_tokens=False)["input_ids"]
        row = []
        for label in task.labels:
            target = target_token_ids(tok, label)
            ids = torch.tensor([prefix + item + target])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            start = len(prefix) + len(item)
            row.append(sum(logp[start - 1 + j, t].item() for j, t in enumerate(target)))
        out.append(row)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_end_to_end_tiny_model_matches_naive_loop(tmp_path, embedded_tokenizer, arch):
    tok = embedded_tokenizer
    write_tiny_downstream(tmp_path)
    tasks = ds.load_downstream_tasks([tmp_path / "missing", tmp_path], ["sst2", "cola"], [1, 1], 3)
    assert tasks[0].items[0] == ("Review: a \"quoted\" joy\nSentiment:", 1)  # subset order, quotes kept
    # CoLA rows are in-domain then out-of-domain: subset row 3 is the second out-of-domain row.
    assert tasks[1].items[0] == ("Sentence: Bark dogs the.\nQuestion: Is this sentence grammatical?\nAnswer:", 0)
    assert tasks[0].few_shot_prompt == "Review: fine film\nSentiment: positive\n\n"
    # A hand-made task with multi-token labels exercises the teacher-forced path with the prefix cache.
    multi = ds.DownstreamTask(name="multi", template="{x}", labels=["very good", "rather poor quality"],
                              few_shot_prompt="Rate it.\n\n", items=[("It was", 0), ("Overall a", 1), ("Meh", 1)],
                              source={"k": 0})
    tasks.append(multi)
    model = make_tiny_model(arch, tok, seed=3)
    calls = []  # (input width, whether a key/value cache came in): the prefix must run once per task, cached
    model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["input_ids"].shape[1],
                                                   any(kwargs.get(k) is not None for k in ("cache", "past_key_values")))),
        with_kwargs=True)
    results = ds.evaluate_downstream(model, tok, tasks, batch_size=2)
    prefix_widths = [len(prompt_token_ids(tok, t.few_shot_prompt)) for t in tasks]
    assert [w for w, cached in calls if not cached] == prefix_widths
    assert sum(cached for _, cached in calls) == 2 + 2 + 3  # batches of 2: 3 + 3 items, 9 (item, label) rows
    assert set(results) == {"sst2", "cola", "multi"}
    for task in tasks:
        r = results[task.name]
        assert set(r) >= {"accuracy", "f1", "mcc", "n", "k", "template", "labels", "predictions", "gold", "seconds"}
        assert r["n"] == 3 and len(r["predictions"]) == 3
        naive = naive_log_likelihoods(model, tok, task)
        fast = ds.label_log_likelihoods(model, tok, task, batch_size=2)
        for f_row, n_row in zip(fast, naive):
            assert f_row == pytest.approx(n_row, abs=1e-4)
        assert r["predictions"] == [max(range(len(row)), key=row.__getitem__) for row in naive]
        assert r["gold"] == [g for _, g in task.items]
        assert r["accuracy"] == ds.accuracy(r["predictions"], r["gold"])
    assert results["sst2"]["k"] == 1 and results["sst2"]["template"] == ds.SST2_TEMPLATE
