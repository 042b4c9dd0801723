"""Batched text generation: seeded top-k sampling (fluency texts, context templates) and greedy decoding.

transformers' `model.generate` (greedy) over left-padded prompts, so every row continues as it would
alone and the key/value cache is transformers' own business. Sampling is a logits processor: each row
draws its token from its own CPU torch.Generator, seeded from `seed` and the row's index in the list, and
masks every other token, so generate's greedy step takes the drawn one. A text depends only on its prompt,
the seed and its index, never on the batch size, the device or the global RNG state.

Texts come back as the decoded prompt + continuation with special tokens dropped (as the references'
`generate_fast` returns them, which is what the context templates and the fluency metric use).
Generation stops at EOS (the tokenizer's or the model's generation config's) or after `max_new_tokens`.
"""
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList


def generate_texts(model, tok, prompts, n_per_prompt=1, max_new_tokens=100, top_k=5, seed=0,
                   batch_size=32) -> list[str]:
    """Top-k sampled continuations: n_per_prompt texts per prompt, prompt by prompt, in order."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    rows = [prompt for prompt in prompts for _ in range(n_per_prompt)]
    seeder = torch.Generator().manual_seed(seed)
    row_seeds = torch.randint(0, 2**62, (len(rows),), generator=seeder).tolist()
    texts = []
    for start in range(0, len(rows), batch_size):
        generators = [torch.Generator().manual_seed(s) for s in row_seeds[start:start + batch_size]]
        texts += _decode(model, tok, rows[start:start + batch_size], max_new_tokens, TopKRowSampler(top_k, generators))
    return texts


def generate_greedy(model, tok, prompts, max_new_tokens=100, batch_size=32) -> list[str]:
    """Greedy (argmax) continuations, one per prompt."""
    texts = []
    for start in range(0, len(prompts), batch_size):
        texts += _decode(model, tok, prompts[start:start + batch_size], max_new_tokens, sampler=None)
    return texts


class TopKRowSampler(LogitsProcessor):
    """Keep only the token each row draws from its top-k, so that generate's greedy step picks it."""

    def __init__(self, top_k: int, generators):
        self.top_k, self.generators = top_k, generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        picks = _sample_top_k(scores, self.top_k, self.generators)
        return torch.full_like(scores, float("-inf")).scatter_(1, picks[:, None], 0.0)


def _sample_top_k(logits: torch.Tensor, top_k: int, generators) -> torch.Tensor:
    """One token per row from the renormalised top-k distribution, drawn on CPU with that row's generator."""
    top = torch.topk(logits.float(), min(top_k, logits.shape[-1]), dim=-1)
    probs = torch.softmax(top.values, dim=-1).double().cpu()
    picks = torch.cat([torch.multinomial(probs[row], 1, generator=gen) for row, gen in enumerate(generators)])
    return top.indices.gather(1, picks.to(top.indices.device)[:, None]).squeeze(1)


def eos_token_ids(model, tok) -> list[int]:
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates = [tok.eos_token_id] + (config_eos if isinstance(config_eos, list) else [config_eos])
    return sorted({i for i in candidates if i is not None})


def _decode(model, tok, prompts, max_new_tokens, sampler) -> list[str]:
    """Greedy `model.generate` of the left-padded batch; `sampler` (a LogitsProcessor) picks the tokens instead."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    encoded = tok(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]
    empty = [i for i, n in enumerate(prompt_mask.sum(dim=1).tolist()) if n == 0]
    if empty:
        raise ValueError(f"prompts {[prompts[i] for i in empty]!r} tokenize to no tokens: nothing to continue")
    eos_ids = eos_token_ids(model, tok)
    continuations = [[] for _ in prompts]
    if max_new_tokens > 0:
        # A config of our own: the model's generation_config (repetition penalties, sampling flags) must not apply.
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos_ids,
                                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0])
        with torch.no_grad():
            generated = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                                       logits_processor=LogitsProcessorList([sampler] if sampler else []))
        continuations = generated[:, prompt_ids.shape[1]:].tolist()

    # Rows that met EOS early were padded until all had: cut each at its first EOS.
    texts = []
    for row in range(len(prompts)):
        kept = prompt_ids[row][prompt_mask[row].bool()].tolist()
        for token in continuations[row]:
            kept.append(token)
            if token in eos_ids:
                break
        texts.append(tok.decode(kept, skip_special_tokens=True))
    return texts
