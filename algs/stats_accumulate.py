"""One pass over the sampled texts: the keys at the input of each edited matrix, accumulated as Σ k kᵀ in float64.

Every layer an edit needs is collected in one pass (hooks on each module's input; the pass stops once the
last of them has run). A batch that runs out of memory is run again in smaller forward chunks of the same
padded width, its keys gathered and accumulated as one product, so the numbers do not depend on the
chunking. Under torchrun, rank r of W takes texts r, r+W, … (`_rank_and_world`, `_agreed`); the caller
all-reduces the totals.
"""
import logging

import torch
import torch.distributed as dist
from tqdm import tqdm

from util.arch import get_module, is_conv1d
from util.tracing import StopForward, run_until

log = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 4096
ACCUMULATE_DTYPES = {"float64": torch.float64, "float32": torch.float32}  # of each batch's k kᵀ; totals are float64


def _batches(texts: list[list[int]], batch_tokens: int):
    """Consecutive texts grouped so that (number of texts × longest text) stays within batch_tokens."""
    batch, longest = [], 0
    for ids in texts:
        if batch and max(longest, len(ids)) * (len(batch) + 1) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(ids)
        longest = max(longest, len(ids))
    if batch:
        yield batch


def _padded(batch: list[list[int]], width: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `batch` right-padded to `width`: real tokens never see the pads."""
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def _forward_keys(model, layer_modules: list[str], input_ids, attention_mask, device) -> dict:
    """{module: its input at every non-pad token (model dtype, on device)} from one forward pass, which
    stops as soon as the last of `layer_modules` has run."""
    attention_mask = attention_mask.to(device)
    counted = attention_mask.bool()
    keys = {}

    def recorder(name):
        def record(module, args, output):
            keys[name] = args[0].detach()[counted]
            if len(keys) == len(layer_modules):
                raise StopForward()
        return record

    handles = [get_module(model, name).register_forward_hook(recorder(name)) for name in layer_modules]
    try:
        run_until(model, input_ids=input_ids.to(device), attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    not_run = [name for name in layer_modules if name not in keys]
    if not_run:
        raise RuntimeError(f"modules {not_run} did not run in the model's forward pass")
    return keys


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or another backend's RuntimeError saying so."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error))


def _batch_keys(model, layer_modules: list[str], batch: list[list[int]], *, pad_token_id: int, device,
                forward_tokens: int) -> tuple[dict, int]:
    """({module: keys of every token of `batch`}, the forward token budget to go on with).

    The batch runs in chunks of whole texts of at most `forward_tokens` padded tokens, each chunk padded to
    the batch's width (every text sees what it sees in one pass). On out-of-memory the budget is halved and
    the batch run again, down to one text per chunk; only then is the error raised.
    """
    width = max(len(ids) for ids in batch)
    input_ids, attention_mask = _padded(batch, width, pad_token_id)
    while True:
        rows = min(len(batch), max(1, forward_tokens // width))
        try:
            chunks = [_forward_keys(model, layer_modules, input_ids[start:start + rows],
                                    attention_mask[start:start + rows], device)
                      for start in range(0, len(batch), rows)]
            return {name: torch.cat([chunk[name] for chunk in chunks]) for name in layer_modules}, forward_tokens
        except RuntimeError as error:
            if rows == 1 or not is_out_of_memory(error):
                raise
        forward_tokens = rows * width // 2  # outside `except`: the failed chunk's tensors are freed first
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("C0: out of memory on %d texts × %d tokens per forward pass; retrying the batch with a "
                    "budget of %d tokens (%d texts per pass)", rows, width, forward_tokens,
                    max(1, forward_tokens // width))


def accumulate_key_products(model, layer_modules: list[str], texts: list[list[int]], *, pad_token_id: int,
                            batch_tokens: int, device, accumulate_dtype: torch.dtype = torch.float64) -> dict:
    """{module: Σ k kᵀ (float64, on device)} over every token of `texts`, k = the module's input, every
    module from the same forward passes.

    Each batch's k kᵀ is formed in accumulate_dtype (float32 is much faster on GPUs with slow float64)
    and added into the float64 total.
    """
    totals = {name: torch.zeros(d_k, d_k, dtype=torch.float64, device=device)
              for name, d_k in ((name, key_dim(get_module(model, name))) for name in layer_modules)}
    forward_tokens = batch_tokens
    n_tokens = sum(len(ids) for ids in texts)
    with torch.no_grad(), tqdm(total=n_tokens, desc=f"C0 {', '.join(layer_modules)}", unit="tok") as progress:
        for batch in _batches(texts, batch_tokens):
            keys, forward_tokens = _batch_keys(model, layer_modules, batch, pad_token_id=pad_token_id, device=device,
                                               forward_tokens=forward_tokens)
            for name, batch_keys in keys.items():
                batch_keys = batch_keys.to(accumulate_dtype)
                totals[name] += (batch_keys.T @ batch_keys).to(torch.float64)
            progress.update(sum(len(ids) for ids in batch))
    return totals


def mean_from_total(total: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Σ k kᵀ / n on CPU, made exactly symmetric (the cache check relies on it)."""
    mean = total.cpu() / n_tokens
    return (mean + mean.T) / 2


def key_dim(module) -> int:
    """d_k: the input width of W (Conv1D stores W as (d_in, d_out), nn.Linear as (d_out, d_in))."""
    return module.weight.shape[0] if is_conv1d(module) else module.in_features


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed statistics need torch.distributed initialised (run under torchrun)")
    return dist.get_rank(), dist.get_world_size()


def _agreed(items: list, distributed: bool) -> list:
    """Rank 0's `items` on every rank (all ranks must run the same collective calls)."""
    if not distributed:
        return items
    holder = [items]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


