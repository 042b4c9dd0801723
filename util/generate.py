"""Batched text generation: seeded top-k sampling (fluency texts, context templates) and greedy decoding.

Our own decoding loop with a KV cache. Prompts are left padded, with the attention mask and position ids
set so that every row continues exactly as it would alone. Each row samples from its own CPU
torch.Generator, seeded from `seed` and the row's index in the list: a text depends only on its prompt,
the seed and its index, never on the batch size, the device or the global RNG state.

Texts come back as the decoded prompt + continuation with special tokens dropped (as the references'
`generate_fast` returns them, which is what the context templates and the fluency metric use).
Generation stops at EOS (the tokenizer's or the model's generation config's) or after `max_new_tokens`.
"""
from functools import partial

import torch


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
        texts += _decode(model, tok, rows[start:start + batch_size], max_new_tokens,
                         partial(_sample_top_k, top_k=top_k, generators=generators))
    return texts


def generate_greedy(model, tok, prompts, max_new_tokens=100, batch_size=32) -> list[str]:
    """Greedy (argmax) continuations, one per prompt."""
    texts = []
    for start in range(0, len(prompts), batch_size):
        texts += _decode(model, tok, prompts[start:start + batch_size], max_new_tokens,
                         lambda logits: logits.argmax(dim=-1))
    return texts


def _sample_top_k(logits: torch.Tensor, top_k: int, generators) -> torch.Tensor:
    """One token per row from the renormalised top-k distribution, drawn on CPU with that row's generator."""
    top = torch.topk(logits.float(), min(top_k, logits.shape[-1]), dim=-1)
    probs = torch.softmax(top.values, dim=-1).double().cpu()
    picks = torch.cat([torch.multinomial(probs[row], 1, generator=gen) for row, gen in enumerate(generators)])
    return top.indices.gather(1, picks.to(top.indices.device)[:, None]).squeeze(1)


def _eos_ids(model, tok) -> list[int]:
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates = [tok.eos_token_id] + (config_eos if isinstance(config_eos, list) else [config_eos])
    return sorted({i for i in candidates if i is not None})


def _decode(model, tok, prompts, max_new_tokens, next_token) -> list[str]:
    """Run the left-padded batch forward with a KV cache, choosing each new token with `next_token`."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    encoded = tok(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]
    empty = [i for i, n in enumerate(prompt_mask.sum(dim=1).tolist()) if n == 0]
    if empty:
        raise ValueError(f"prompts {[prompts[i] for i in empty]!r} tokenize to no tokens: nothing to continue")
    eos_ids = _eos_ids(model, tok)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    batch = prompt_ids.shape[0]

    mask = prompt_mask
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    step_ids, cache = prompt_ids, None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = next_token(out.logits[:, -1, :])
            new_tokens.append(token)
            finished = finished | torch.isin(token, eos)
            if finished.all():
                break
            step_ids = token[:, None]
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            positions = positions[:, -1:] + 1

    # Rows that met EOS early kept being fed tokens until all had: cut each at its first EOS.
    continuations = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in range(batch)]
    texts = []
    for row in range(batch):
        kept = prompt_ids[row][prompt_mask[row].bool()].tolist()
        for token in continuations[row]:
            kept.append(token)
            if token in eos_ids:
                break
        texts.append(tok.decode(kept, skip_special_tokens=True))
    return texts
