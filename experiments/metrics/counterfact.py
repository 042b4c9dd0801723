"""CounterFact metrics (SPEC §6): teacher-forced target scores, per-case NLLs, and ES/PS/NS, EM/PM/NM.

score(x) = mean per-token NLL of the tokens of " " + x after a prefix. The prefix is tokenized with the
tokenizer's normal special tokens (BOS for Llama-like tokenizers) and the target separately, without
special tokens; their ids are concatenated. Tokenizing "prefix target" as one string could merge tokens
across the boundary and shift where the target starts; separate tokenization cannot.

`score_targets` is the one teacher-forcing helper: CounterFact NLLs and zsRE token accuracy both use it.
"""
import math
from dataclasses import dataclass

import torch

from util.prefix_cache import PrefixCache
from util.tokens import length_batches, pad_batch, prompt_token_ids, target_token_ids

DEFAULT_BATCH_SIZE = 64
# Padded tokens (rows × longest row) per forward pass: the logits are that many vocabulary-sized rows, so one
# 2,400-token prompt padded into a batch of 64 would take ~12 GB. Typical batches (64 × <= 64 tokens) fit.

# (metrics key, success score, magnitude score, the target the model should prefer)
SCORED_GROUPS = (
    ("rewrite_prompts_nll", "ES", "EM", "target_new"),
    ("paraphrase_prompts_nll", "PS", "PM", "target_new"),
    ("neighborhood_prompts_nll", "NS", "NM", "target_true"),
)
OTHER_TARGET = {"target_new": "target_true", "target_true": "target_new"}


def record_field(record: dict, *keys):
    """record[k1][k2]..., or a ValueError that names the case and the missing key path."""
    value = record
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            path = ".".join(keys[:depth + 1])
            raise ValueError(f"record (case_id {record.get('case_id', '?')!r}) has no field {path!r}")
        value = value[key]
    return value


def string_list(record: dict, key: str) -> list[str]:
    """record[key] checked to be a list of strings."""
    value = record_field(record, key)
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"record (case_id {record.get('case_id', '?')!r}): {key!r} must be a list of strings")
    return value


def rewrite_prompt(record: dict) -> str:
    """The requested rewrite's prompt template with the subject filled in for "{}"."""
    template = record_field(record, "requested_rewrite", "prompt")
    if "{}" not in template:
        raise ValueError(f"record (case_id {record.get('case_id', '?')!r}): prompt {template!r} has no '{{}}'")
    return template.replace("{}", record_field(record, "requested_rewrite", "subject"))


@dataclass(frozen=True)
class TargetScores:
    """Per target token: log p(token | prefix, earlier target tokens) and whether it is the argmax."""

    log_probs: list[float]
    correct: list[bool]


def score_targets(model, tok, prefixes, targets, batch_size=DEFAULT_BATCH_SIZE,
                  share_prefixes=True) -> list[TargetScores]:
    """Teacher-forced scores of each target after its prefix. share_prefixes: each distinct prefix runs once
    and its targets continue from its key/value cache; False (the baseline) runs every prefix + target row."""
    if len(prefixes) != len(targets):
        raise ValueError(f"{len(prefixes)} prefixes but {len(targets)} targets")
    pairs = []
    for prefix, target in zip(prefixes, targets):
        prefix_ids = prompt_token_ids(tok, prefix)
        if not prefix_ids:
            raise ValueError(f"prefix {prefix!r} tokenizes to no tokens: nothing to condition the target on")
        pairs.append((prefix_ids, target_token_ids(tok, target)))
    scores = [None] * len(pairs)
    by_prefix = {}  # each distinct prefix runs once; all of its targets are scored from it
    for index, (prefix, _) in enumerate(pairs):
        by_prefix.setdefault(tuple(prefix), []).append(index)
    prefixes = list(by_prefix)
    for indices in length_batches([len(prefix) for prefix in prefixes], batch_size):
        groups = [by_prefix[prefixes[i]] for i in indices]
        shared = _score_shared_prefixes(model, tok, [list(prefixes[i]) for i in indices],
                                        [[pairs[j][1] for j in group] for group in groups]) if share_prefixes else None
        members = [j for group in groups for j in group]
        for index, score in zip(members, shared if shared is not None else
                                _score_batch(model, tok, [pairs[j] for j in members])):
            scores[index] = score
    return scores


def _score_shared_prefixes(model, tok, prefixes, targets_per_prefix) -> list[TargetScores] | None:
    """Scores of every target of every prefix (in order), each prefix run once with a key/value cache: its
    last logits score the targets' first tokens, and only multi-token targets are continued from the cache.
    None when the model keeps no cache (then full rows are scored)."""
    cache = PrefixCache(model, tok, prefixes)
    if not cache.available:
        return None
    first = torch.log_softmax(cache.last_logits.float(), dim=-1)
    continued = [(i, target) for i, targets in enumerate(targets_per_prefix) for target in targets if len(target) > 1]
    later = iter(())
    if continued:
        rows = torch.tensor([i for i, _ in continued], device=first.device)
        with torch.no_grad():
            logits = cache.continue_rows(rows, [target[:-1] for _, target in continued], keep_cache=False)
        later = iter(torch.log_softmax(logits.float(), dim=-1))
    scores = []
    for i, targets in enumerate(targets_per_prefix):
        for target in targets:
            target_ids = torch.tensor(target, device=first.device)
            log_probs = first[i:i + 1] if len(target) == 1 else torch.cat([first[i:i + 1],
                                                                           next(later)[:len(target) - 1]])
            scores.append(TargetScores(log_probs=log_probs.gather(1, target_ids[:, None]).squeeze(1).tolist(),
                                       correct=(log_probs.argmax(dim=-1) == target_ids).tolist()))
    return scores


def _score_batch(model, tok, pairs) -> list[TargetScores]:
    device = next(model.parameters()).device
    batch = pad_batch(tok, [prefix + target for prefix, target in pairs], padding_side="right", device=device)
    with torch.no_grad():
        logits = model(**batch).logits
    scores = []
    for row, (prefix, target) in enumerate(pairs):
        # The logits at position i predict token i + 1: the target's tokens are predicted from
        # the prefix's last position up to the target's second-to-last.
        predicting = slice(len(prefix) - 1, len(prefix) + len(target) - 1)
        log_probs = torch.log_softmax(logits[row, predicting].float(), dim=-1)
        target_ids = torch.tensor(target, device=log_probs.device)
        scores.append(TargetScores(
            log_probs=log_probs.gather(1, target_ids[:, None]).squeeze(1).tolist(),
            correct=(log_probs.argmax(dim=-1) == target_ids).tolist(),
        ))
    return scores


def target_nll(model, tok, prefixes, targets, batch_size=DEFAULT_BATCH_SIZE, share_prefixes=True) -> list[float]:
    """SPEC §6 score: mean per-token NLL of " " + target after the prefix, one per (prefix, target) pair."""
    return [-sum(s.log_probs) / len(s.log_probs)
            for s in score_targets(model, tok, prefixes, targets, batch_size, share_prefixes)]


def counterfact_case_metrics(model, tok, record: dict, generation=None, batch_size=DEFAULT_BATCH_SIZE) -> dict:
    """NLLs of both targets after every rewrite/paraphrase/neighborhood prompt, in one batched call.

    Prompt groups the record lacks are left out; attribute_prompts are not scored (no metric of
    SPEC §6 uses them). `generation`: a generation.GenerationSettings; when given, its result is
    stored under "generation".
    """
    metrics = counterfact_metrics_many(model, tok, [record], batch_size)[0]
    if generation is not None:
        metrics["generation"] = generation.evaluate(model, tok, record)
    return metrics


def counterfact_metrics_many(model, tok, records: list, batch_size=DEFAULT_BATCH_SIZE,
                             share_prefixes=True) -> list[dict]:
    """counterfact_case_metrics (without generation) of many cases, their prompts batched together:
    the retention re-scoring of every case edited so far. share_prefixes=False: the baseline scoring."""
    target_pairs, layouts = [], []
    for record in records:
        target_new = record_field(record, "requested_rewrite", "target_new", "str")
        target_true = record_field(record, "requested_rewrite", "target_true", "str")
        groups = {"rewrite_prompts": [rewrite_prompt(record)]}
        for key in ("paraphrase_prompts", "neighborhood_prompts"):
            if key in record:
                groups[key] = string_list(record, key)
        target_pairs += [(prompt, target) for prompts in groups.values() for prompt in prompts
                         for target in (target_new, target_true)]
        layouts.append({key: len(prompts) for key, prompts in groups.items()})
    nlls = iter(target_nll(model, tok, [p for p, _ in target_pairs], [t for _, t in target_pairs], batch_size,
                           share_prefixes))
    return [{f"{key}_nll": [{"target_new": next(nlls), "target_true": next(nlls)} for _ in range(count)]
             for key, count in layout.items()} for layout in layouts]


def counterfact_case_scores(case_metrics: dict) -> dict:
    """ES/PS/NS (fractions of prompts where the right target has the lower NLL) and EM/PM/NM
    (mean p(right) − p(wrong), p = exp(−NLL)); GE and RS from the generation entry when present.
    A group absent or empty in the case gives no score (not 0)."""
    scores = {}
    for key, success, magnitude, preferred in SCORED_GROUPS:
        pairs = case_metrics.get(key)
        if not pairs:
            continue
        other = OTHER_TARGET[preferred]
        scores[success] = sum(p[preferred] < p[other] for p in pairs) / len(pairs)
        scores[magnitude] = sum(math.exp(-p[preferred]) - math.exp(-p[other]) for p in pairs) / len(pairs)
    generation = case_metrics.get("generation", {})
    if "ngram_entropy" in generation:
        scores["GE"] = generation["ngram_entropy"]
    if "reference_score" in generation:
        scores["RS"] = generation["reference_score"]
    return scores


def harmonic_mean(values) -> float:
    """Harmonic mean of non-negative values; 0 when any value is 0 (e.g. the score S of ES, PS, NS)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("harmonic_mean of no values")
    if any(v < 0 or math.isnan(v) for v in values):
        raise ValueError(f"harmonic_mean needs non-negative numbers, got {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)
