"""Generation-based success (SPEC §11): greedy answers, cut at their end, matched against the targets.

Teacher forcing puts the target's first tokens in the context; here the model must *say* the answer.
The answer of a continuation is its text from the first non-space character (leading spaces and newlines
are skipped: a model may begin its answer on the next line) up to the first newline or sentence end.
A sentence end is ".", "!" or "?" followed by whitespace; a "." after a one-character word ("U.S. Army",
"J. K. Rowling", "1. FC Köln") or after a title abbreviation ("St. Petersburg", "Mr. McMahon") is not one,
so names with initials are not cut. A sentence end needs the character after it, so decoding continues one
token past a final "." (the answer is then exactly what the uncut continuation would give).
A target matches when its SQuAD-normalised text is a prefix of the normalised answer ending on a word
boundary: "Paris" matches "Paris, France" but NOT "Parisian".
"""
import re
import string
import unicodedata
from functools import partial

import torch

from dsets.editing_eval import flatten_answers
from util.generate import eos_token_ids
from util.prefix_cache import PrefixCache
from util.tokens import length_batches, prompt_token_ids, target_token_ids

MIN_NEW_TOKENS = 16  # SPEC §11: at most max(16, the target's token count + 8) new tokens
EXTRA_NEW_TOKENS = 8
DEFAULT_BATCH_SIZE = 64
TITLE_ABBREVIATIONS = frozenset({"Mr", "Mrs", "Ms", "Dr", "St", "Mt", "Ft", "Jr", "Sr", "Prof", "Gen", "Rep", "Univ"})
ANSWER_END = re.compile(r"[\r\n]|[.!?](?=\s)")
LAST_WORD = re.compile(r"(\w+)$")
ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation removed (ASCII and Unicode), the articles a/an/the
    removed, whitespace collapsed."""
    text = "".join(c for c in text.lower()
                   if c not in string.punctuation and not unicodedata.category(c).startswith("P"))
    return " ".join(ARTICLES.sub(" ", text).split())


def _answer_span(continuation: str) -> tuple[int, int | None]:
    """(start, end) of the answer in the continuation; end is None while no newline/sentence end is seen."""
    start = len(continuation) - len(continuation.lstrip())
    for match in ANSWER_END.finditer(continuation, start):
        if match.group() == "." and _is_abbreviation(continuation[start:match.start()]):
            continue
        return start, match.start()
    return start, None


def _is_abbreviation(text_before_period: str) -> bool:
    word = LAST_WORD.search(text_before_period)
    return word is not None and (len(word.group(1)) == 1 or word.group(1) in TITLE_ABBREVIATIONS)


def answer_complete(continuation: str) -> bool:
    """Whether more text can no longer change the answer (a newline or sentence end follows it)."""
    return _answer_span(continuation)[1] is not None


def answer_text(continuation: str) -> str:
    """The answer a generated continuation gives (see the module docstring), without the terminator."""
    start, end = _answer_span(continuation)
    return continuation[start:end].rstrip()


def prefix_match(answer: str, targets) -> bool:
    """Some non-empty normalised target is a prefix of the normalised answer, on a word boundary
    ("Paris" matches "Paris, France", not "Parisian"). An empty answer matches nothing."""
    normalized = normalize_answer(answer)
    return any(target and (normalized == target or normalized.startswith(target + " "))
               for target in map(normalize_answer, flatten_answers(targets)))


def default_max_new_tokens(tok, targets) -> int:
    """max(16, the longest target's token count + 8) (SPEC §11)."""
    lengths = [len(target_token_ids(tok, target)) for target in flatten_answers(targets) if target.strip()]
    return max([MIN_NEW_TOKENS] + [n + EXTRA_NEW_TOKENS for n in lengths])


def match_decided(continuation: str, targets) -> bool:
    """Whether more text can no longer change prefix_match(answer_text(continuation), targets): the answer
    is complete, or its complete words (those followed by whitespace) already match or contradict every
    target. A trailing partial word decides nothing ("Th" may become the article "The")."""
    start, end = _answer_span(continuation)
    if end is not None:
        return True
    words = normalize_answer(continuation[start:].rpartition(" ")[0]).split()
    for target in flatten_answers(targets):
        target_words = normalize_answer(target).split()
        if target_words and len(words) < len(target_words) and words == target_words[:len(words)]:
            return False
    return True


def greedy_continuations(model, tok, prompts, max_new_tokens, batch_size=DEFAULT_BATCH_SIZE,
                         decide_targets=None) -> list[str]:
    """The greedy continuation text (without the prompt) of each prompt, as one-prompt-at-a-time decoding
    would give it: it ends at EOS, at max_new_tokens (one limit, or one per prompt), or once its answer is
    complete. decide_targets (per prompt: a target, an alias list, or None): end it as soon as its match
    against them is decided (match_decided) — the text is then only as long as the match needs.
    Identical prompts are decoded once; prompts are batched by length."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in limits):
        raise ValueError(f"max_new_tokens must be a positive integer or one per prompt, got {max_new_tokens!r}")
    decide = [None] * len(prompts) if decide_targets is None else list(decide_targets)
    if len(decide) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(decide)} decide_targets")

    def ends(i: int, tokens: list) -> bool:
        text = tok.decode(tokens, skip_special_tokens=True)
        return len(tokens) >= limits[i] or (answer_complete(text) if decide[i] is None
                                             else match_decided(text, decide[i]))

    copies = {}  # each distinct prompt runs once, until every copy of it has ended
    for i, prompt in enumerate(prompts):
        copies.setdefault(prompt, []).append(i)
    distinct = list(copies)
    prompt_ids = [prompt_token_ids(tok, prompt) for prompt in distinct]
    empty = [prompt for prompt, ids in zip(distinct, prompt_ids) if not ids]
    if empty:
        raise ValueError(f"prompts {empty!r} tokenize to no tokens: nothing to continue")
    eos_ids = set(eos_token_ids(model, tok))
    texts = [None] * len(prompts)
    for rows in length_batches([len(ids) for ids in prompt_ids], batch_size):
        groups = [copies[distinct[row]] for row in rows]
        generated = _decode_greedy(model, tok, [prompt_ids[row] for row in rows], eos_ids,
                                   partial(_all_ended, ends, groups))
        for group, tokens in zip(groups, generated):
            for i in group:  # each copy ends where it would have alone: the first length at which it ends
                length = next((n for n in range(1, len(tokens) + 1) if ends(i, tokens[:n])), len(tokens))
                texts[i] = tok.decode(tokens[:length], skip_special_tokens=True)
    return texts


def _all_ended(ends, groups, row: int, tokens: list) -> bool:
    return all(ends(i, tokens) for i in groups[row])


def _decode_greedy(model, tok, prompt_ids, eos_ids, ended) -> list[list[int]]:
    """Greedy tokens of each left-padded prompt, one step at a time from the key/value cache, until EOS or
    ended(row, tokens); rows that end leave the batch (their cache rows are dropped), so later steps cost
    only the rows still going."""
    prefix = PrefixCache(model, tok, prompt_ids)
    if not prefix.available:
        raise ValueError(f"{type(model).__name__} returns no key/value cache: greedy decoding needs one")
    cache, mask, positions = prefix.cache, prefix.mask, prefix.lengths
    tokens = [[] for _ in prompt_ids]
    active = list(range(len(prompt_ids)))
    logits = prefix.last_logits
    while True:
        going = []
        for slot, token in enumerate(logits.argmax(dim=-1).tolist()):
            row = active[slot]
            if token not in eos_ids:
                tokens[row].append(token)
                if not ended(row, tokens[row]):
                    going.append(slot)
        if not going:
            return tokens
        if len(going) < len(active):
            kept = torch.tensor(going, device=mask.device)
            cache.batch_select_indices(kept)
            mask, positions = mask[kept], positions[kept]
            active = [active[slot] for slot in going]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step = torch.tensor([[tokens[row][-1]] for row in active], device=mask.device)
        with torch.no_grad():
            logits = model(input_ids=step, attention_mask=mask, position_ids=positions[:, None], use_cache=True,
                           **{prefix.keyword: cache}).logits[:, -1]
        positions = positions + 1


def generation_success(model, tok, prompts, targets, max_new_tokens=None, full_answers=True,
                       batch_size=DEFAULT_BATCH_SIZE) -> list[dict]:
    """Per prompt {"answer": its greedy answer, "success": whether it matches its targets (a string or
    aliases)}. max_new_tokens: None gives each prompt default_max_new_tokens of its targets.
    full_answers (one flag, or one per prompt) False: the row stops once its success is decided (the same
    success, far fewer decoding steps when an answer goes wrong early); "answer" is then the answer as far
    as it was generated."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    limits = [default_max_new_tokens(tok, t) for t in targets] if max_new_tokens is None else max_new_tokens
    full = [full_answers] * len(prompts) if isinstance(full_answers, bool) else list(full_answers)
    continuations = greedy_continuations(model, tok, prompts, limits, batch_size,
                                         decide_targets=[None if f else t for f, t in zip(full, targets)])
    answers = [answer_text(c) for c in continuations]
    return [{"answer": answer, "success": prefix_match(answer, target)} for answer, target in zip(answers, targets)]
