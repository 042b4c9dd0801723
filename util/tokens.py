"""Token-level helpers shared by editing and evaluation: target tokens, subject positions, padded batches."""
import torch

FACT_TOKENS = ("subject_last", "subject_first", "subject_first_after_last", "last")


def target_token_ids(tok, target: str) -> list:
    """Tokens of " " + target without special tokens (a leading BOS or a lone SentencePiece "▁" is dropped)."""
    if not target.strip():
        raise ValueError(f"target {target!r} is empty")
    ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if ids and tok.bos_token_id is not None and ids[0] == tok.bos_token_id:
        ids = ids[1:]
    if len(ids) > 1 and tok.convert_ids_to_tokens(ids[0]) == "\u2581":
        ids = ids[1:]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return ids


def prompt_token_ids(tok, text: str) -> list:
    """Tokens of a prompt with the tokenizer's usual special tokens (BOS for Llama-like tokenizers)."""
    return tok(text)["input_ids"]


def subject_token_index(tok, template: str, subject: str, fact_token: str = "subject_last") -> int:
    """Index, in the unpadded tokens of template.format(subject), of the token `fact_token` names.

    Counts the tokens of the prompt prefix and of prefix + subject (a trailing space of the prefix belongs
    to the subject's first token in byte-level BPE and SentencePiece alike), then checks the count
    against the tokens of the whole prompt; if a merge crosses the subject boundary, character offsets decide.
    """
    if fact_token not in FACT_TOKENS:
        raise ValueError(f"fact_token must be one of {FACT_TOKENS}, got {fact_token!r}")
    if template.count("{}") != 1:
        raise ValueError(f"prompt template must contain exactly one '{{}}': {template!r}")
    if not subject.strip():  # the span would be empty and the index would point before it (at -1)
        raise ValueError(f"subject {subject!r} is empty: no token of {template!r} holds it")
    prefix, suffix = template.split("{}")
    full_ids = prompt_token_ids(tok, prefix + subject + suffix)
    if fact_token == "last":
        return len(full_ids) - 1
    n_prefix = len(prompt_token_ids(tok, prefix.rstrip(" "))) if prefix.strip(" ") else _n_special_prefix(tok)
    subject_ids = prompt_token_ids(tok, prefix + subject)
    n_until_subject_end = len(subject_ids)
    if full_ids[:n_until_subject_end] != subject_ids:
        n_prefix, n_until_subject_end = _subject_span_from_offsets(tok, prefix, subject, suffix)
    if fact_token == "subject_first":
        # Before some subjects (digits, in SentencePiece and byte-level BPE alike) the space is a token of its own.
        while n_prefix < n_until_subject_end - 1 and not tok.decode([full_ids[n_prefix]]).strip():
            n_prefix += 1
        return n_prefix
    if fact_token == "subject_last":
        return n_until_subject_end - 1
    if n_until_subject_end >= len(full_ids):
        raise ValueError(f"subject_first_after_last: nothing follows the subject in {template!r}")
    return n_until_subject_end


def _n_special_prefix(tok) -> int:
    """Tokens an empty prompt gets (a BOS, or nothing)."""
    return len(prompt_token_ids(tok, ""))


def _subject_span_from_offsets(tok, prefix: str, subject: str, suffix: str):
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"cannot locate subject {subject!r} in tokens of {prefix + subject + suffix!r}")
    start, end = len(prefix), len(prefix) + len(subject)
    encoded = tok(prefix + subject + suffix, return_offsets_mapping=True)
    covering = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and a < end and b > start]
    if not covering:
        raise ValueError(f"no token covers subject {subject!r} in {prefix + subject + suffix!r}")
    return covering[0], covering[-1] + 1


def padded_index(index: int, length: int, padded_length: int, padding_side: str) -> int:
    """Position of unpadded token `index` of a sequence of `length` tokens in a batch padded to `padded_length`."""
    if padding_side == "right":
        return index
    if padding_side == "left":
        return index + padded_length - length
    raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")


def pad_batch(tok, sequences, padding_side: str = "right", device=None) -> dict:
    """Pad lists of token ids into input_ids + attention_mask tensors."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), tok.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        start = 0 if padding_side == "right" else width - len(ids)
        input_ids[row, start:start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, start:start + len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


MAX_BATCH_TOKENS = 4096  # padded tokens per batch in length_batches


def length_batches(lengths: list[int], batch_size: int, max_tokens: int = MAX_BATCH_TOKENS) -> list[list[int]]:
    """Indices grouped by length, shortest first, into batches of at most `batch_size` rows and `max_tokens`
    padded tokens: a long prompt is padded together with similar ones only, never the rest."""
    batches, current = [], []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if current and (len(current) == batch_size or (len(current) + 1) * lengths[index] > max_tokens):
            batches.append(current)
            current = []
        current.append(index)
    return batches + [current] if current else batches
