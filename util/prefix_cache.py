"""Run the shared beginning of many sequences once and continue each row from its key/value cache.

The target optimisation runs the tokens before the subject once and only the rest at every step; the
evaluation runs a prompt once and scores both of its targets from it. Prefixes are left-padded so that
every continuation starts at the same cache position; positions are passed explicitly and the attention
mask hides the pads. A row with an empty prefix sees one pad token in the prefix pass only (no attention row
is ever empty, so no NaN can enter the cache), which its continuation masks out like every other pad.
"""
import copy

import torch

from util.tokens import pad_batch
from util.tracing import accepts_forward_argument, cache_keyword, output_cache


class PrefixCache:
    """Key/value cache of a batch of token-id prefixes (lists, possibly empty).

    `last_logits[i]`: the logits after prefix i (predicting the first continuation token); None for an
    empty prefix. `available` is False when the model returns no cache (then callers run full rows).
    """

    def __init__(self, model, tok, prefixes: list):
        self.model, self.tok = model, tok
        device = next(model.parameters()).device
        width = max(max(len(ids) for ids in prefixes), 1)
        ids = torch.full((len(prefixes), width), tok.pad_token_id, dtype=torch.long)
        self.mask = torch.zeros((len(prefixes), width), dtype=torch.long)
        for row, prefix in enumerate(prefixes):
            if prefix:
                ids[row, width - len(prefix):] = torch.tensor(prefix, dtype=torch.long)
                self.mask[row, width - len(prefix):] = 1
        pass_mask = self.mask.clone()
        pass_mask[:, -1] = 1
        positions = (pass_mask.cumsum(1) - 1).clamp_min(0)
        self.lengths = torch.tensor([len(prefix) for prefix in prefixes], device=device)
        self.mask = self.mask.to(device)
        last_only = {"logits_to_keep": 1} if accepts_forward_argument(model, "logits_to_keep") else {}
        with torch.no_grad():
            out = model(input_ids=ids.to(device), attention_mask=pass_mask.to(device),
                        position_ids=positions.to(device), use_cache=True, **last_only)
        self.cache = output_cache(out)
        self.available = self.cache is not None
        self.last_logits = out.logits[:, -1]
        self.keyword = cache_keyword(model)

    def continue_rows(self, rows: torch.Tensor, suffixes: list, keep_cache: bool = True, **forward_kwargs):
        """Logits (len(rows), longest suffix, vocab) of prefix rows[i] continued by suffixes[i] (non-empty,
        right-padded; a row index may repeat). keep_cache=False lets this call consume the cache (no copy):
        use it for the last call. forward_kwargs go to the model (e.g. logits_to_keep)."""
        cache = copy.deepcopy(self.cache) if keep_cache else self.cache
        if len(rows) != len(self.lengths) or not torch.equal(rows, torch.arange(len(rows), device=rows.device)):
            cache.batch_select_indices(rows)
        batch = pad_batch(self.tok, suffixes, "right", device=self.mask.device)
        width = batch["input_ids"].shape[1]
        positions = self.lengths[rows][:, None] + torch.arange(width, device=self.mask.device)[None]
        return self.model(input_ids=batch["input_ids"], position_ids=positions, use_cache=True,
                          attention_mask=torch.cat([self.mask[rows], batch["attention_mask"]], 1),
                          **{self.keyword: cache}, **forward_kwargs).logits
