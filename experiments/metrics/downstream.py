"""Downstream model-health checks for sequential editing (SPEC §9): GLUE-style tasks, MMLU, perplexity.

Editing many facts can quietly damage a model's general abilities; these checks measure that damage.
Each task is a class-balanced subset whose rows, in order, are listed in
`downstream/editing_subsets/subset_membership.json` (the reference editing repos' subsets): the first k
rows are the few-shot examples, the next n_tests rows are scored.

Scoring is by label likelihood (the reference's `f1_new` way): for every test item, the log-likelihood of
each label's verbalisation after few-shot prompt + item prompt is computed, and the argmax is the
prediction. It is deterministic and has no unparseable answers.

Tokenization (as in experiments/metrics/counterfact.py): the few-shot prompt is tokenized with the
tokenizer's usual special tokens (`prompt_token_ids`), the item prompt without special tokens, and each
label with `target_token_ids` (which prepends the space itself: labels are stored WITHOUT a leading
space, and the few-shot answers are written as prompt + " " + label). Tokenizing the three parts
separately lets the few-shot prefix be run through the model once per task and its key/value cache be
shared by every item, which is what makes the check cheap.
"""
import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from util.errors import InputError
from util.tokens import pad_batch, prompt_token_ids, target_token_ids
from util.prefix_cache import PrefixCache
from util.tracing import accepts_forward_argument

TASKS = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu")

SUBSETS_FILE = "editing_subsets/subset_membership.json"
SUBSET_KEYS = {
    "sst2": "ume_sst2",
    "mrpc": "ume_mrpc",
    "cola": "ume_cola",
    "rte": "ume_rte",
    "nli": "ume_nli(=RTE train)",
    "mmlu": "ume_mmlu(=MMLU validation, balanced)",
}
# Files each task reads, relative to <data_dir>/downstream/.
TASK_FILES = {
    "sst2": ("sst2/dev.tsv",),
    "mrpc": ("mrpc/dev.tsv",),
    "cola": ("cola/in_domain_dev.tsv", "cola/out_of_domain_dev.tsv"),
    "rte": ("rte/validation.parquet",),
    "nli": ("rte/train.parquet",),
    "mmlu": ("mmlu/val/zero_shot_mmlu_val.json",),
}

# Prompt formats (recorded in the results). Labels: index = class id of the source file; no leading space
# (target_token_ids adds it).
SST2_TEMPLATE = "Review: {text}\nSentiment:"
MRPC_TEMPLATE = "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Do both sentences mean the same thing?\nAnswer:"
COLA_TEMPLATE = "Sentence: {sentence}\nQuestion: Is this sentence grammatical?\nAnswer:"
RTE_TEMPLATE = "{premise}\nQuestion: Does this imply that \"{hypothesis}\"?\nAnswer:"
MMLU_HEADER = "The following are multiple choice questions (with answers).\n\n"
MMLU_TEMPLATE = MMLU_HEADER + "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:"
MMLU_SOURCE_HEADER_START = "The following are multiple choice questions"
TASK_LABELS = {
    "sst2": ["negative", "positive"],   # SST-2: 0 negative, 1 positive
    "mrpc": ["no", "yes"],              # MRPC: 1 = paraphrase
    "cola": ["no", "yes"],              # CoLA: 1 = acceptable
    "rte": ["yes", "no"],               # RTE: 0 = entailment, 1 = not entailment
    "nli": ["yes", "no"],               # "nli" is RTE train: same labels
    "mmlu": ["A", "B", "C", "D"],
}
TASK_TEMPLATES = {
    "sst2": SST2_TEMPLATE, "mrpc": MRPC_TEMPLATE, "cola": COLA_TEMPLATE,
    "rte": RTE_TEMPLATE, "nli": RTE_TEMPLATE, "mmlu": MMLU_TEMPLATE,
}

WIKITEXT_FILES = ("wikitext-2-raw/wiki.test.raw", "wikitext-2/test.txt")
DATA_FIX = "use the files of ../shared/data/downstream (checked by its verify.py)"


class DownstreamDataMissing(InputError, FileNotFoundError):
    """A downstream data file is in none of the data dirs; the message says where we looked and how to fix it."""

    def __init__(self, task: str, paths_looked_in):
        self.task = task
        self.paths_looked_in = [str(p) for p in paths_looked_in]
        super().__init__(f"downstream data for task {task!r} not found", f"{', '.join(self.paths_looked_in)}",
                         "put the `downstream/` folder (layout of ../shared/data/downstream) in the data dir, "
                         "or pass --data_dir / set KE_DATA_DIR to a directory that contains it")


@dataclass
class DownstreamTask:
    """One task, ready to score: the few-shot prefix shared by all items and the (prompt, gold class id) items."""

    name: str
    template: str
    labels: list
    few_shot_prompt: str
    items: list = field(default_factory=list)
    source: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Loading


def _validate_request(tasks, few_shots, n_tests):
    """All argument checks, before any file is read (the CLI calls the loader before loading a model)."""
    tasks, few_shots = list(tasks), list(few_shots)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise InputError(f"unknown downstream task(s) {unknown}", "--downstream_tasks",
                         f"valid tasks: {', '.join(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise InputError(f"downstream tasks listed twice: {tasks}", "--downstream_tasks", "name each task once")
    if len(tasks) != len(few_shots):
        raise InputError(f"{len(tasks)} downstream tasks but {len(few_shots)} few-shot counts", "--number_of_few_shots",
                         "give one k for all tasks or one per task")
    for task, k in zip(tasks, few_shots):
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError(f"few-shot count for {task!r} is {k!r}", "--number_of_few_shots",
                             "give integers >= 0")
    if isinstance(n_tests, bool) or not isinstance(n_tests, int) or n_tests < 1:
        raise InputError(f"number of tests is {n_tests!r}", "--number_of_tests", "give an integer >= 1")
    return tasks, few_shots


def _find_task_dir(data_dirs, task) -> Path:
    """The first `<data_dir>/downstream` holding both the task's files and the subset list."""
    needed = TASK_FILES[task] + (SUBSETS_FILE,)
    looked = []
    for data_dir in data_dirs:
        root = Path(data_dir) / "downstream"
        missing = [root / rel for rel in needed if not (root / rel).is_file()]
        if not missing:
            return root
        looked += missing
    if not looked:
        raise InputError("no data directories given", "load_downstream_tasks", "give the data dirs to look in")
    raise DownstreamDataMissing(task, looked)


def _read_tsv(path: Path, encoding="utf-8") -> list:
    """Rows of a tab-separated file; quote characters are text (QUOTE_NONE), as in the GLUE files."""
    with open(path, encoding=encoding, newline="") as f:
        return [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]


def _read_parquet(path: Path) -> list:
    import pyarrow.parquet as pq  # installed with `datasets`; imported here so the module loads without it

    return pq.read_table(path).to_pylist()


def _sst2_rows(root: Path) -> list:
    rows = _read_tsv(root / "sst2/dev.tsv")
    header, data = rows[0], rows[1:]
    if header[:2] not in (["text", "label"], ["sentence", "label"]):
        raise InputError(f"unexpected header {header}", str(root / "sst2/dev.tsv"), DATA_FIX)
    return [(SST2_TEMPLATE.format(text=r[0].strip()), int(r[1])) for r in data]


def _mrpc_rows(root: Path) -> list:
    # utf-8-sig drops the byte-order mark of the first header cell.
    rows = _read_tsv(root / "mrpc/dev.tsv", encoding="utf-8-sig")
    header, data = rows[0], rows[1:]
    if header[0] != "Quality" or len(header) != 5:
        raise InputError(f"unexpected header {header}", str(root / "mrpc/dev.tsv"), DATA_FIX)
    out = []
    for r in data:
        if len(r) != 5:
            raise InputError(f"a row with {len(r)} fields instead of 5: {r}", str(root / "mrpc/dev.tsv"), DATA_FIX)
        out.append((MRPC_TEMPLATE.format(sentence1=r[3].strip(), sentence2=r[4].strip()), int(r[0])))
    return out


def _cola_rows(root: Path) -> list:
    """In-domain rows then out-of-domain rows (GLUE's CoLA dev order: subset rows 527-1042 are out-of-domain)."""
    out = []
    for rel in TASK_FILES["cola"]:
        for r in _read_tsv(root / rel):
            if len(r) != 4:
                raise InputError(f"a row with {len(r)} fields instead of 4: {r}", str(root / rel), DATA_FIX)
            out.append((COLA_TEMPLATE.format(sentence=r[3].strip()), int(r[1])))
    return out


def _rte_rows(path: Path) -> list:
    return [(RTE_TEMPLATE.format(premise=r["sentence1"].strip(), hypothesis=r["sentence2"].strip()), int(r["label"]))
            for r in _read_parquet(path)]


def _mmlu_question(source_input: str) -> str:
    """The item's zero-shot prompt without its per-subject header line (the task adds one generic header)."""
    text = source_input.strip()
    if text.startswith(MMLU_SOURCE_HEADER_START) and "\n\n" in text:
        text = text.split("\n\n", 1)[1]
    return text


def _mmlu_rows(root: Path) -> list:
    path = root / TASK_FILES["mmlu"][0]
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            letter = record["output"].strip()
            if letter not in TASK_LABELS["mmlu"]:
                raise InputError(f"answer {letter!r} is not one of A-D", str(path), DATA_FIX)
            out.append((_mmlu_question(record["input"]), TASK_LABELS["mmlu"].index(letter)))
    return out


def _task_rows(task: str, root: Path) -> list:
    """All rows of the task's source, as (item prompt, gold class id), in file order."""
    if task == "sst2":
        return _sst2_rows(root)
    if task == "mrpc":
        return _mrpc_rows(root)
    if task == "cola":
        return _cola_rows(root)
    if task in ("rte", "nli"):
        return _rte_rows(root / TASK_FILES[task][0])
    return _mmlu_rows(root)


def format_few_shot(task: str, examples) -> str:
    """k examples as prompt + " " + answer, each followed by a blank line (MMLU: one header at the top)."""
    labels = TASK_LABELS[task]
    text = "".join(f"{prompt} {labels[gold]}\n\n" for prompt, gold in examples)
    return MMLU_HEADER + text if task == "mmlu" else text


def load_downstream_tasks(data_dirs: list, tasks: list, few_shots: list, n_tests: int) -> list:
    """Rebuild the reference subsets: subset rows 0..k-1 are the few-shot examples, k..k+n_tests-1 the items.

    `data_dirs` are searched in order for `downstream/`; the first that has a task's files wins.
    All validation happens here, so that a bad request fails before any model is loaded.
    """
    tasks, few_shots = _validate_request(tasks, few_shots, n_tests)
    data_dirs = [data_dirs] if isinstance(data_dirs, (str, Path)) else list(data_dirs)
    loaded = []
    for task, k in zip(tasks, few_shots):
        root = _find_task_dir(data_dirs, task)
        with open(root / SUBSETS_FILE, encoding="utf-8") as f:
            subsets = json.load(f)
        key = SUBSET_KEYS[task]
        if key not in subsets:
            raise InputError(f"no subset {key!r} for task {task!r}", str(root / SUBSETS_FILE), DATA_FIX)
        order = subsets[key]["target_rows_in_pickle_order"]
        if k + n_tests > len(order):
            raise InputError(f"task {task!r}: {k} few-shot + {n_tests} tests = {k + n_tests} rows, but its subset has "
                             f"only {len(order)}", "--number_of_few_shots / --number_of_tests",
                             f"ask for at most {len(order)} rows in all")
        rows = _task_rows(task, root)
        if max(order[:k + n_tests]) >= len(rows):
            raise InputError(f"task {task!r}: subset row {max(order[:k + n_tests])} is past the end of its source "
                             f"({len(rows)} rows)", str(root), DATA_FIX)
        for prompt, gold in rows:
            if not 0 <= gold < len(TASK_LABELS[task]):
                raise InputError(f"task {task!r}: gold label {gold} out of range for labels {TASK_LABELS[task]}",
                                 str(root), DATA_FIX)
        few = [rows[i] for i in order[:k]]
        items = [rows[i] for i in order[k:k + n_tests]]
        loaded.append(DownstreamTask(
            name=task,
            template=TASK_TEMPLATES[task],
            labels=list(TASK_LABELS[task]),
            few_shot_prompt=format_few_shot(task, few),
            items=items,
            source={"files": [str(root / rel) for rel in TASK_FILES[task]], "subset": key,
                    "subset_file": str(root / SUBSETS_FILE), "k": k, "n": n_tests,
                    "few_shot_rows": order[:k], "test_rows": order[k:k + n_tests]},
        ))
    return loaded


# ----------------------------------------------------------------------------------------------------
# Metrics (pure)


def accuracy(pred, gold) -> float:
    """Fraction of items predicted right."""
    pred, gold = list(pred), list(gold)
    if len(pred) != len(gold) or not gold:
        raise ValueError(f"need equally many, and some, predictions and golds: {len(pred)} vs {len(gold)}")
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def _confusion(pred, gold, n_classes) -> torch.Tensor:
    pred, gold = list(pred), list(gold)
    if len(pred) != len(gold) or not gold:
        raise ValueError(f"need equally many, and some, predictions and golds: {len(pred)} vs {len(gold)}")
    matrix = torch.zeros((n_classes, n_classes), dtype=torch.float64)  # rows: gold, columns: predicted
    for p, g in zip(pred, gold):
        if not (0 <= p < n_classes and 0 <= g < n_classes):
            raise ValueError(f"class id out of range 0..{n_classes - 1}: pred {p}, gold {g}")
        matrix[g, p] += 1
    return matrix


def macro_f1(pred, gold, n_classes) -> float:
    """Mean F1 over the classes that occur in gold or in pred.

    A class that is neither present nor predicted has no defined F1 and is left out of the mean
    (sklearn's f1_score(average="macro") over the observed labels does the same); a class present in
    gold but never predicted, or predicted but absent, counts with F1 = 0.
    """
    matrix = _confusion(pred, gold, n_classes)
    scores = []
    for c in range(n_classes):
        tp = matrix[c, c].item()
        fp = matrix[:, c].sum().item() - tp
        fn = matrix[c, :].sum().item() - tp
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def matthews_corrcoef(pred, gold, n_classes) -> float:
    """Multi-class MCC (Gorodkin's R_K); the usual MCC for 2 classes; 0 when the denominator is 0.

    With confusion matrix C, s = n items, c = trace(C), t_k = gold counts, p_k = predicted counts:
    (c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)).
    """
    matrix = _confusion(pred, gold, n_classes)
    s = matrix.sum().item()
    c = matrix.trace().item()
    t = matrix.sum(dim=1)
    p = matrix.sum(dim=0)
    denominator = (s * s - (p * p).sum().item()) * (s * s - (t * t).sum().item())
    if denominator <= 0:
        return 0.0
    return (c * s - (p * t).sum().item()) / math.sqrt(denominator)


# ----------------------------------------------------------------------------------------------------
# Scoring


def _score_rows(model, tok, prefix_ids, rows, batch_size, device):
    """Sum of label-token log-probs for each row.

    rows: (suffix token ids, n_item, [(row_key, label token ids)]). The labels are scored at positions
    n_item-1 .. n_item-2+len(label) of the suffix (a label's tokens are appended to the suffix when it is
    longer than one token; a single-token label needs only the last item position). The shared prefix runs
    once (util.prefix_cache); a model that keeps no cache gets it in every row. Rows are sorted by length so
    batches are padded little; the result is a dict row_key -> log-likelihood.
    """
    cache = PrefixCache(model, tok, [prefix_ids]) if prefix_ids else None
    cache = cache if cache is not None and cache.available else None
    offset = 0 if cache is not None else len(prefix_ids)  # without a cache the prefix is part of every row
    keep_positions = accepts_forward_argument(model, "logits_to_keep")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    scores = {}
    for start in range(0, len(order), batch_size):
        batch_rows = [rows[i] for i in order[start:start + batch_size]]
        # (row, position, token) for every label token to read.
        reads = [(r, offset + n_item - 1 + j, token)
                 for r, (_, n_item, labels) in enumerate(batch_rows) for _, label in labels
                 for j, token in enumerate(label)]
        positions = sorted({pos for _, pos, _ in reads})
        kwargs = {}
        if keep_positions:
            kwargs["logits_to_keep"] = torch.tensor(positions, device=device)
            column = {pos: i for i, pos in enumerate(positions)}
        else:
            column = {pos: pos for pos in positions}
        if cache is not None:
            every_row_on_the_prefix = torch.zeros(len(batch_rows), dtype=torch.long, device=device)
            logits = cache.continue_rows(every_row_on_the_prefix, [ids for ids, _, _ in batch_rows], **kwargs)
        else:
            batch = pad_batch(tok, [list(prefix_ids) + ids for ids, _, _ in batch_rows], padding_side="right",
                              device=device)
            logits = model(**batch, **kwargs).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        for r, (_, n_item, labels) in enumerate(batch_rows):
            for key, label in labels:
                scores[key] = sum(log_probs[r, column[offset + n_item - 1 + j], token].item()
                                  for j, token in enumerate(label))
    return scores


def label_log_likelihoods(model, tok, task: DownstreamTask, batch_size: int = 16) -> list:
    """Per item, the log-likelihood (sum over its tokens) of each label after few-shot prompt + item prompt.

    When every label is one token, one forward pass per item serves all labels (read at the item's last
    token); otherwise each (item, label) pair is teacher-forced. The few-shot prefix runs once per task.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    prefix_ids = prompt_token_ids(tok, task.few_shot_prompt) if task.few_shot_prompt else prompt_token_ids(tok, "")
    label_ids = [target_token_ids(tok, label) for label in task.labels]
    single_token = all(len(ids) == 1 for ids in label_ids)
    rows = []
    for i, (prompt, _) in enumerate(task.items):
        item_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if not item_ids:
            raise ValueError(f"task {task.name!r}: item {i} prompt {prompt!r} tokenizes to nothing")
        if single_token:
            rows.append((item_ids, len(item_ids), [((i, c), ids) for c, ids in enumerate(label_ids)]))
        else:
            # The last label token is never an input, so it is not appended.
            rows += [(item_ids + ids[:-1], len(item_ids), [((i, c), ids)]) for c, ids in enumerate(label_ids)]
    with torch.no_grad():
        scores = _score_rows(model, tok, prefix_ids, rows, batch_size, device)
    return [[scores[(i, c)] for c in range(len(label_ids))] for i in range(len(task.items))]


def evaluate_downstream(model, tok, tasks, batch_size: int = 16) -> dict:
    """Per task: accuracy, macro-F1, MCC, predictions and the prompt format, for the results file."""
    results = {}
    for task in tasks:
        started = time.perf_counter()
        likelihoods = label_log_likelihoods(model, tok, task, batch_size)
        predictions = [max(range(len(scores)), key=scores.__getitem__) for scores in likelihoods]
        gold = [g for _, g in task.items]
        n_classes = len(task.labels)
        results[task.name] = {
            "accuracy": accuracy(predictions, gold),
            "f1": macro_f1(predictions, gold, n_classes),
            "mcc": matthews_corrcoef(predictions, gold, n_classes),
            "n": len(task.items),
            "k": task.source.get("k"),
            "template": task.template,
            "labels": list(task.labels),
            "predictions": predictions,
            "gold": gold,
            "seconds": time.perf_counter() - started,
        }
    return results


# ----------------------------------------------------------------------------------------------------
# Perplexity


def load_perplexity_chunks(data_dirs, tok, n_chunks: int = 16, chunk_tokens: int = 256):
    """The first n_chunks consecutive, non-overlapping chunks of chunk_tokens tokens of WikiText-2 test.

    Looks for wikitext-2-raw/wiki.test.raw, then wikitext-2/test.txt, in each data dir (and its
    downstream/). Only a leading part of the text is tokenized (cut at a line end, with tokens to spare so
    the cut cannot change the kept tokens): deterministic and fast. No special tokens are added.
    """
    if n_chunks < 1 or chunk_tokens < 2:
        raise ValueError(f"need n_chunks >= 1 and chunk_tokens >= 2, got {n_chunks}, {chunk_tokens}")
    data_dirs = [data_dirs] if isinstance(data_dirs, (str, Path)) else list(data_dirs)
    candidates = [Path(d) / sub / rel for d in data_dirs for sub in ("", "downstream") for rel in WIKITEXT_FILES]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DownstreamDataMissing("perplexity (WikiText-2 test)", candidates)
    text = path.read_text(encoding="utf-8")
    needed = n_chunks * chunk_tokens
    limit = 8 * needed
    while True:
        cut = len(text) if limit >= len(text) else text.rfind("\n", 0, limit) + 1
        ids = tok(text[:cut], add_special_tokens=False)["input_ids"]
        if len(ids) >= needed + 64 or cut == len(text):
            break
        limit *= 2
    if len(ids) < needed:
        raise InputError(f"{len(ids)} tokens, fewer than {n_chunks} x {chunk_tokens}", str(path),
                         "give the whole WikiText-2 test file")
    chunks = [ids[i * chunk_tokens:(i + 1) * chunk_tokens] for i in range(n_chunks)]
    return chunks, {"file": str(path), "n_chunks": n_chunks, "chunk_tokens": chunk_tokens}


def perplexity(model, tok, chunks, batch_size: int = 8) -> float:
    """exp(mean NLL over every predicted token): each chunk predicts its tokens 1..T-1 from its own prefix."""
    if not chunks or any(len(c) < 2 for c in chunks):
        raise ValueError("perplexity needs chunks of at least 2 tokens each")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(chunks), batch_size):
            group = chunks[start:start + batch_size]
            batch = pad_batch(tok, group, padding_side="right", device=device)
            logits = model(**batch).logits[:, :-1].float()
            targets = batch["input_ids"][:, 1:]
            mask = batch["attention_mask"][:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            total_nll += nll[mask].sum().item()
            total_tokens += int(mask.sum().item())
    return math.exp(total_nll / total_tokens)
