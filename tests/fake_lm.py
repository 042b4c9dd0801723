"""A causal LM whose greedy continuations are scripted, for metrics checked by hand.

ScriptedLM(tok, {prompt: continuation}): after the tokens of a prompt plus the first k tokens of its
continuation, the argmax is continuation token k; after the whole continuation it is EOS; any other history
gets `filler` (so decoding runs on to its limit). Its key/value "cache" holds each row's unpadded token
history, so a cache row dropped or selected wrongly changes the answers. `rows_run` counts the rows of
every forward pass.
"""
from types import SimpleNamespace

import pytest
import torch

from util.tokens import prompt_token_ids

FILLER = " and"


class HistoryCache:
    """Each row's tokens so far; updated in place like transformers' DynamicCache."""

    def __init__(self, histories: list):
        self.histories = histories

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.histories = [self.histories[i] for i in indices.tolist()]


class ScriptedLM(torch.nn.Module):
    def __init__(self, tok, scripts: dict, filler: str = FILLER):
        super().__init__()
        self.vocab_size = len(tok)
        self.eos = tok.eos_token_id
        self.filler = tok(filler, add_special_tokens=False)["input_ids"][0]
        self.scripts = [(prompt_token_ids(tok, prompt), tok(continuation, add_special_tokens=False)["input_ids"])
                        for prompt, continuation in scripts.items()]
        self.rows_run = []
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def next_token(self, history: list) -> int:
        for prompt, continuation in self.scripts:
            done = len(history) - len(prompt)
            if done >= 0 and history[:len(prompt)] == prompt and history[len(prompt):] == continuation[:done]:
                return continuation[done] if done < len(continuation) else self.eos
        return self.filler

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                **unused):
        rows, width = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask[:, -width:]
        cache = past_key_values or HistoryCache([[] for _ in range(rows)])
        assert len(cache.histories) == rows, "cache rows and input rows differ"
        logits = torch.zeros(rows, width, self.vocab_size)
        for row in range(rows):
            for position in range(width):
                if mask[row, position]:
                    cache.histories[row] = cache.histories[row] + [int(input_ids[row, position])]
                logits[row, position, self.next_token(cache.histories[row])] = 10.0
        self.rows_run.append(rows)
        return SimpleNamespace(logits=logits, past_key_values=cache)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads and contend on a busy machine; restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
