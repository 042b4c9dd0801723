"""Measure what the framework's shortcuts cost and save, each against a baseline measured in the same run.

Sections (pick with --only):
  stats    FastMEMIT's capped C0 (dynamic_multiplier × d_k tokens) vs a larger whole-article sample:
           time, tokens, ‖C0_cap − C0_full‖/‖C0_full‖, and the same for the EMMET (rho = 0) edit Δ solved
           from each C0 for real keys and seeded random residuals; also computing vs reading the disk cache.
  multilayer  C0 of MEMIT's layers (hparams/MEMIT/smollm2-135m.json, or --layers) with a cold cache: one
           forward pass for all layers vs one pass per layer (the code before the one-pass change), and
           the one pass with float32 per-batch products: time, speed-up, largest C0 relative difference.
  solver   pm_solver.solve_update on a random SPD C0: the B×B form vs the d_k×d_k form (least squares,
           rho = 1), and B×B with the cached Cholesky factor vs a fresh d_k×d_k solve per batch as the
           reference code does it; with the largest relative difference between the Δs.
  targets  keyvals.compute_targets for 4 CounterFact requests, optimised together vs one at a time.
  eval     CounterFact case metrics (rewrite, paraphrase and neighbourhood prompts, both targets) with shared
           prompt prefixes vs the baseline (every prompt + target row), per case, and the largest NLL difference.
  generation  greedy answers to every prompt of 10 CounterFact cases (GES/GPS/GNS) against their teacher-forced
           scoring, per case: answers stopped once their match is decided (the CLI's way) and full answers.
  e2e      a CounterFact run with EMMET (hparams/EMMET/smollm2-135m.json) at batch 1 and 8: per case, evaluation
           before and after plus the edit: neither prefix cache (the baseline), the engine called directly
           (distribute.apply_to_model) and the Editor (as the CLI runs it); the time per phase (templates,
           statistics, targets, keys, solve, evaluation) and the ratios baseline/engine and Editor/engine.
  prefix   the target optimisation with the prefix cache (tokens before the subject run once) vs the
           baseline (every token every step), for EMMET's and ROME's templates at batch 1 and 16: seconds per
           edit, speed-up and the largest relative difference of the target vectors.

Every figure is a measurement of this run on this machine (seconds are shown for context only);
nothing is asserted. Times are the best of --repeats runs, fewer when one run already takes long.

Example: python scripts/benchmark.py --only solver --dks 1024 4096 --threads 2
"""
import argparse
import dataclasses
import functools
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the packages beside this file, never another checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from algs.hparams import EditHparams
from algs.keyvals import compute_keys, compute_targets, context_templates
from algs.requests import request_of
from algs.pm_solver import FactorCache, PreservationFactor, solve_update
from algs.stats_corpus import HUB_POOL_ARTICLES, corpus_sources, load_articles, sample_token_ids
from algs.second_moment import default_max_length, layer_second_moment, layer_second_moments
from algs.stats_accumulate import key_dim
from experiments.metrics import format_table
from util.arch import get_module, module_names, num_layers, weight_as_out_in
from util.globals import REPO_ROOT
from util.io import read_json
from util.models import load_model, model_identity

SECTIONS = ("stats", "multilayer", "solver", "targets", "prefix", "eval", "generation", "e2e")
# A timed call is repeated (up to --repeats) only while the runs so far took less than this in total.
REPEAT_BUDGET_S = 1.0
# Real CounterFact cases (ROME schema: `prompt` holds "{}" for the subject); case ids 0, 13, 18, 70.
REQUESTS = [
    {"case_id": 0, "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
     "target_new": {"str": "English"}},
    {"case_id": 13, "prompt": "{}, developed by", "subject": "Ferrari F40", "target_new": {"str": "Microsoft"}},
    {"case_id": 18, "prompt": "{}, created by", "subject": "Porsche 911", "target_new": {"str": "Honda"}},
    {"case_id": 70, "prompt": "The twin city of {} is", "subject": "Beirut", "target_new": {"str": "Florence"}},
]
TEMPLATE_PARAMS = [[10, 5]]
# Target-optimisation hparams of hparams/EMMET/smollm2-135m.json (the step count comes from --steps).
TARGET_HPARAMS = {"v_lr": 0.5, "v_weight_decay": 1e-3, "clamp_norm_factor": 4.0, "kl_factor": 0.0625,
                  "fact_token": "subject_last"}
SOLVER_D_V = 1024  # rows of the random residuals in the solver section
SOLVER_C0_RANK = 256  # random C0 = A Aᵀ / rank + C0_FLOOR · I: SPD, with a spread-out spectrum
C0_FLOOR = 0.1


def parse_sections(text: str) -> list:
    sections = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise argparse.ArgumentTypeError(f"sections must be a comma-separated subset of {','.join(SECTIONS)}, "
                                         f"got {text!r}")
    return sections


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=parse_sections, default=list(SECTIONS),
                        help=f"comma-separated sections to run (default: {','.join(SECTIONS)})")
    parser.add_argument("--device", default="cpu", help="device of the model (default cpu; e.g. cuda)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the machine is shared)")
    parser.add_argument("--repeats", type=int, default=3,
                        help=f"best of this many runs per timing, fewer once the runs took {REPEAT_BUDGET_S} s "
                             "(default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw and sample (default 0)")
    parser.add_argument("--model", default="smollm2-135m",
                        help="model for the stats and targets sections (default: the embedded smollm2-135m)")
    parser.add_argument("--layer", type=int, default=4, help="edited layer (default 4)")
    parser.add_argument("--corpus", default=str(REPO_ROOT.parent / "shared" / "data" / "wikitext-2"),
                        help="stats: corpus for C0, a local text file / directory of .txt/.raw files or a hub "
                             "corpus name of algs.second_moment (default: ../shared/data/wikitext-2 beside the repo)")
    parser.add_argument("--multipliers", type=float, nargs="+", default=[2.0, 10.0],
                        help="stats: FastMEMIT dynamic_multiplier values to compare (default: 2 10)")
    parser.add_argument("--full_factor", type=float, default=5.0,
                        help="stats: the full baseline takes as many whole articles as fit in this many times "
                             "the largest cap's tokens, or the whole corpus when it is smaller (default 5; with the "
                             "default corpus, 8 takes all of it, ~122k tokens, ~2 min on one thread)")
    parser.add_argument("--layers", type=int, nargs="+",
                        help="multilayer: edited layers (default: those of hparams/MEMIT/smollm2-135m.json)")
    parser.add_argument("--dks", type=int, nargs="+", default=[1024, 4096],
                        help="solver: key dimensions d_k (default: 1024 4096)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16, 256],
                        help="solver: numbers of edits B per batch (default: 1 16 256)")
    parser.add_argument("--steps", type=int, default=5, help="targets, prefix: v_num_grad_steps (default 5)")
    parser.add_argument("--prefix_batches", type=int, nargs="+", default=[1, 16],
                        help="prefix: batch sizes (requests optimised together; default 1 16)")
    parser.add_argument("--eval_cases", type=int, default=10, help="eval: CounterFact cases (default 10)")
    parser.add_argument("--e2e_batches", type=int, nargs="+", default=[1, 8],
                        help="e2e: EMMET batch sizes; each runs that many cases (default 1 8)")
    parser.add_argument("--e2e_cases", type=int, default=4, help="e2e: cases at batch size 1 (default 4)")
    parser.add_argument("--data_dir", default=str(REPO_ROOT.parent / "shared" / "data"),
                        help="prefix: data dir with CounterFact (default: ../shared/data beside the repo)")
    args = parser.parse_args(argv)
    for name in ("threads", "repeats", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.full_factor <= 1 or min(args.multipliers) <= 0:
        parser.error("--full_factor must be > 1 and every --multipliers value > 0")
    return args


# ---------------------------------------------------------------- helpers

def best_time(repeats: int, fn, *args, **kwargs):
    """(result of the last run of fn(*args, **kwargs), shortest wall time of up to `repeats` runs)."""
    times = []
    while len(times) < repeats and sum(times) < REPEAT_BUDGET_S:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return result, min(times)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius), in float64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def print_table(title: str, header: list, rows: list) -> None:
    print(f"\n== {title}\n" + format_table(header, rows), flush=True)


# ---------------------------------------------------------------- 1. FastMEMIT statistics

def full_baseline_articles(tok, corpus: str, budget: int, seed: int, max_length: int) -> int:
    """How many whole articles, in the seeded sample order, fit in `budget` tokens (all when the corpus is smaller)."""
    _, articles = load_articles(corpus, corpus_sources(corpus, HUB_POOL_ARTICLES))
    texts = sample_token_ids(tok, articles, seed=seed, max_length=max_length, n_articles=len(articles))
    total = n_articles = 0
    while n_articles < len(texts) and total + len(texts[n_articles]) <= budget:
        total += len(texts[n_articles])
        n_articles += 1
    return n_articles


def bench_stats(model, tok, args) -> None:
    module_name = module_names(model).rewrite_module_tmp.format(args.layer)
    module = get_module(model, module_name)
    d_k, d_v = key_dim(module), weight_as_out_in(module).shape[0]
    model_id, revision = model_identity(model)
    budget = round(args.full_factor * max(round(m * d_k) for m in args.multipliers))
    n_full = full_baseline_articles(tok, args.corpus, budget, args.seed, default_max_length(model))
    if n_full == 0:
        raise ValueError(f"no whole article of {args.corpus} fits in {budget} tokens; raise --full_factor")
    configs = [(f"cap m={m:g}", True, m, 0) for m in args.multipliers]
    configs.append((f"full {n_full} articles", False, 0.0, n_full))

    templates = context_templates(model, tok, TEMPLATE_PARAMS, args.seed)
    keys = compute_keys(model, tok, module_name, REQUESTS, templates, TARGET_HPARAMS["fact_token"]).averaged.T
    residuals = torch.randn(d_v, keys.shape[1], dtype=torch.float64,
                            generator=torch.Generator().manual_seed(args.seed))

    measured = {}
    with tempfile.TemporaryDirectory(prefix="benchmark_stats_") as stats_dir:
        for label, dynamic, multiplier, n_samples in configs:
            second_moment = functools.partial(
                layer_second_moment, model, tok, module_name, corpus=args.corpus, dynamic=dynamic,
                dynamic_multiplier=multiplier, n_samples=n_samples, model_id=model_id, model_revision=revision,
                stats_dir=stats_dir, seed=args.seed)
            moment, t_compute = best_time(1, second_moment)  # once: a second run would read the cache
            reread, t_read = best_time(args.repeats, second_moment)
            delta, diagnostics = solve_update(residuals, keys, PreservationFactor(moment.matrix, 1.0), rho=0.0)
            measured[label] = (moment, reread.cache, t_compute, t_read, delta, diagnostics)

    full_moment, _, t_full, _, full_delta, _ = measured[configs[-1][0]]
    rows = []
    for label, (moment, reread_status, t_compute, t_read, delta, diagnostics) in measured.items():
        note = "SVD fallback" if diagnostics["fallback"] else ""
        rows.append([label, str(moment.n_tokens), str(moment.n_texts), t_compute, t_full / t_compute,
                     rel_diff(moment.matrix, full_moment.matrix), rel_diff(delta, full_delta),
                     diagnostics["cond_P"] or float("inf"), reread_status, t_compute / t_read, note])
    print_table(f"stats: C0 of {module_name} (d_k {d_k}) from {full_moment.corpus}; EMMET rho=0 Δ for "
                f"{len(REQUESTS)} real keys, seeded random residuals; baseline = the full sample",
                ["sample", "tokens", "texts", "compute_s", "full/this time", "C0 rel diff", "Δ rel diff",
                 "cond(C0)", "2nd call", "compute/cache-read time", "note"], rows)


# ---------------------------------------------------------------- 1b. one statistics pass for several layers

MEMIT_HPARAMS = REPO_ROOT / "hparams" / "MEMIT" / "smollm2-135m.json"


def bench_multilayer(model, tok, args) -> None:
    hparams = read_json(MEMIT_HPARAMS)
    layers = args.layers or hparams["layers"]
    names = [module_names(model).rewrite_module_tmp.format(layer) for layer in layers]
    model_id, revision = model_identity(model)
    common = {"corpus": args.corpus, "dynamic": True, "dynamic_multiplier": hparams["dynamic_multiplier"],
              "n_samples": 0, "model_id": model_id, "model_revision": revision, "seed": args.seed}

    def per_layer(stats_dir):
        return {name: layer_second_moment(model, tok, name, stats_dir=stats_dir, **common) for name in names}

    def one_pass(stats_dir, accumulate_dtype="float64"):
        return layer_second_moments(model, tok, names, stats_dir=stats_dir, accumulate_dtype=accumulate_dtype,
                                    **common)

    runs = {}
    for label, compute in (("one pass per layer", per_layer), ("one pass, all layers", one_pass),
                           ("one pass, float32 products", functools.partial(one_pass, accumulate_dtype="float32"))):
        with tempfile.TemporaryDirectory(prefix="benchmark_multilayer_") as stats_dir:  # cold cache
            runs[label] = best_time(1, compute, stats_dir)
    (baseline, t_baseline), (exact, _) = runs["one pass per layer"], runs["one pass, all layers"]
    rows = []
    for label, (moments, seconds) in runs.items():
        reference = exact if "float32" in label else baseline
        worst = max(rel_diff(moments[name].matrix, reference[name].matrix) for name in names)
        rows.append([label, str(len(names) if label == "one pass per layer" else 1), seconds, t_baseline / seconds,
                     worst])
    first = baseline[names[0]]
    print_table(f"multilayer: C0 of {len(names)} layers {layers} ({names[0]} ...), {first.n_tokens} tokens "
                f"(multiplier {hparams['dynamic_multiplier']:g} × d_k) of {first.corpus}, cold cache; C0 rel diff: "
                "max over layers vs per-layer (float32 row: vs the float64 one pass)",
                ["mode", "passes", "time_s", "per-layer/this time", "max C0 rel diff"], rows)


# ---------------------------------------------------------------- 2. solver forms

def bxb_cold(R, K, C0, cache):
    """The B×B form as a layer's first batch runs it: the Cholesky factor of C0 is built first."""
    return solve_update(R, K, PreservationFactor(C0, 1.0), 1.0, form="bxb")[0]


def bxb_cached(R, K, C0, cache):
    """The B×B form of every later batch: the factor comes from the FactorCache."""
    return solve_update(R, K, cache.get("bench", C0, 1.0), 1.0, form="bxb")[0]


def dkxdk(R, K, C0, cache):
    """The d_k×d_k push-through form: solves C0 + K Kᵀ, so there is no factor to reuse."""
    return solve_update(R, K, cache.get("bench", C0, 1.0), 1.0, form="dkxdk")[0]


def fresh(R, K, C0, cache):
    """The reference code's MEMIT step: Δ = R Kᵀ (C0 + K Kᵀ)⁻¹ by one d_k×d_k solve, no diagnostics."""
    return torch.linalg.solve(C0 + K @ K.mT, K @ R.mT).mT


SOLVE_VARIANTS = (bxb_cold, bxb_cached, dkxdk, fresh)


def bench_solver(args) -> None:
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for d_k in args.dks:
        A = torch.randn(d_k, SOLVER_C0_RANK, dtype=torch.float64, generator=generator)
        C0 = A @ A.mT / SOLVER_C0_RANK + C0_FLOOR * torch.eye(d_k, dtype=torch.float64)
        cache = FactorCache()
        cache.get("bench", C0, 1.0)  # the per-layer factor, built once as in an editing run
        for B in args.batch_sizes:
            K = torch.randn(d_k, B, dtype=torch.float64, generator=generator)
            R = torch.randn(SOLVER_D_V, B, dtype=torch.float64, generator=generator)
            deltas, seconds = {}, {}
            for variant in SOLVE_VARIANTS:
                deltas[variant], seconds[variant] = best_time(args.repeats, variant, R, K, C0, cache)
            worst = max(rel_diff(deltas[v], deltas[bxb_cached]) for v in SOLVE_VARIANTS)
            rows.append([str(d_k), str(B), *(seconds[v] * 1e3 for v in SOLVE_VARIANTS),
                         seconds[dkxdk] / seconds[bxb_cold], seconds[fresh] / seconds[bxb_cached], worst])
    print_table("solver: least squares (rho=1) on a random SPD C0; bxb_cold builds the Cholesky factor, "
                "bxb_cached reuses it (FactorCache), fresh = torch.linalg.solve of the d_k×d_k system",
                ["d_k", "B", *(f"{v.__name__}_ms" for v in SOLVE_VARIANTS), "dkxdk/bxb_cold time",
                 "fresh/bxb_cached time", "max Δ rel diff"], rows)


# ---------------------------------------------------------------- 3. target batching

def bench_targets(model, tok, args) -> None:
    hp = EditHparams(layers=[args.layer], v_num_grad_steps=args.steps, v_loss_layer=num_layers(model) - 1,
                     context_template_length_params=TEMPLATE_PARAMS, **TARGET_HPARAMS)
    target_module = module_names(model).layer_module_tmp.format(args.layer)
    templates = context_templates(model, tok, TEMPLATE_PARAMS, args.seed)

    def targets(requests, max_requests, hparams=hp):
        return compute_targets(model, tok, target_module, requests, templates, hparams, max_requests=max_requests)

    targets(REQUESTS[:1], 1, dataclasses.replace(hp, v_num_grad_steps=1))  # warm-up, untimed
    batched, t_batched = best_time(1, targets, REQUESTS, len(REQUESTS))
    single, t_single = best_time(1, targets, REQUESTS, 1)
    delta_batched, delta_single = batched.targets - batched.initial, single.targets - single.initial
    target_diff = max(rel_diff(a, b) for a, b in zip(batched.targets, single.targets))
    delta_diff = max(rel_diff(a, b) for a, b in zip(delta_batched, delta_single))
    rows = [[f"all {len(REQUESTS)} together", str(len(REQUESTS)), t_batched, 1.0, 0.0, 0.0],
            ["one at a time", "1", t_single, t_single / t_batched, target_diff, delta_diff]]
    print_table(f"targets: compute_targets at {target_module}, {len(REQUESTS)} CounterFact requests, "
                f"{args.steps} steps, templates {TEMPLATE_PARAMS}; baseline = all together",
                ["mode", "max_requests", "time_s", "time / baseline", "max target rel diff",
                 "max (target-initial) rel diff"], rows)


# Context templates of hparams/EMMET/smollm2-135m.json (groups, the default) and hparams/ROME/smollm2-135m.json (flat).
PREFIX_TEMPLATES = {"EMMET": ([[10, 5]], False), "ROME": ([[5, 5], [10, 5]], True)}


def bench_prefix(model, tok, args) -> None:
    from dsets import load_records

    records = load_records("cf", args.data_dir, max(args.prefix_batches))
    requests = [request_of(record) for record in records]
    names = module_names(model)
    rows = []
    for objective, (length_params, flat) in PREFIX_TEMPLATES.items():
        target_module = (names.mlp_module_tmp if objective == "ROME" else names.layer_module_tmp).format(args.layer)
        hp = EditHparams(layers=[args.layer], v_num_grad_steps=args.steps, v_loss_layer=num_layers(model) - 1,
                         context_template_length_params=length_params, **TARGET_HPARAMS)
        templates = context_templates(model, tok, length_params, args.seed, flat=flat)
        for batch in args.prefix_batches:
            timed = {}
            for cached in (False, True):
                timed[cached] = best_time(args.repeats, compute_targets, model, tok, target_module, requests[:batch],
                                          templates, hp, max_requests=batch, prefix_cache=cached)
            diff = max(rel_diff(a, b) for a, b in zip(timed[True][0].targets, timed[False][0].targets))
            rows.append([objective, str(batch), timed[False][1] / batch, timed[True][1] / batch,
                         timed[False][1] / timed[True][1], diff])
    print_table(f"prefix: target optimisation per edit, {args.steps} steps, layer {args.layer}; baseline = every "
                f"token every step", ["templates", "batch", "baseline s/edit", "cached s/edit", "speed-up",
                                      "max target rel diff"], rows)


def bench_eval(model, tok, args) -> None:
    from experiments.metrics.counterfact import counterfact_metrics_many

    records = rome_schema_records(args.data_dir, args.eval_cases)
    rows, results = [], {}
    for label, shared, per_call in (("baseline, one case per call", False, 1), ("shared prefixes, one case", True, 1),
                                    (f"shared prefixes, {len(records)} cases per call", True, len(records))):
        def run():
            return [m for start in range(0, len(records), per_call)
                    for m in counterfact_metrics_many(model, tok, records[start:start + per_call],
                                                      share_prefixes=shared)]
        results[label], seconds = best_time(args.repeats, run)
        rows.append([label, seconds / len(records)])
    baseline = next(iter(results.values()))

    def nlls(metrics):
        return torch.tensor([pair[t] for case in metrics for group in case.values() for pair in group
                             for t in ("target_new", "target_true")], dtype=torch.float64)

    for row, metrics in zip(rows, results.values()):
        row += [rows[0][1] / row[1], ((nlls(metrics) - nlls(baseline)).abs() / nlls(baseline).abs()).max().item()]
    print_table(f"eval: CounterFact case metrics ({len(records)} ROME-schema cases, 13 prompts x 2 targets each); "
                "baseline = every prompt + target row", ["mode", "s/case", "speed-up", "max NLL rel diff"], rows)


def bench_generation(model, tok, args) -> None:
    """Generation-based scoring (greedy answers to every rewrite, paraphrase and neighbourhood prompt) against the
    teacher-forced scoring of the same CounterFact cases, per case: answers stopped once decided (the default)
    and full answers."""
    from experiments.metrics.counterfact import counterfact_metrics_many
    from experiments.metrics.generative import generation_metrics_many

    records = rome_schema_records(args.data_dir, args.eval_cases)
    modes = {"teacher-forced (counterfact_metrics_many)": lambda: counterfact_metrics_many(model, tok, records),
             "generated, stopped once decided": lambda: generation_metrics_many(model, tok, records, "cf"),
             "generated, full answers": lambda: generation_metrics_many(model, tok, records, "cf",
                                                                        full_answers=True)}
    seconds = {label: best_time(args.repeats, run)[1] for label, run in modes.items()}
    base = next(iter(seconds.values()))
    print_table(f"generation: scoring {len(records)} ROME-schema CounterFact cases (13 prompts each), per case",
                ["mode", "s/case", "x teacher-forced"], [[label, t / len(records), t / base]
                                                          for label, t in seconds.items()])


def rome_schema_records(data_dir: str, n: int) -> list:
    """The first n CounterFact records of the ROME-schema copy (2 paraphrases, 10 neighbourhood prompts)."""
    from dsets import load_records

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "counterfact_rome").symlink_to(Path(data_dir).resolve() / "counterfact_rome")
        return list(load_records("cf", tmp, n))


E2E_MODES = ("baseline", "engine", "Editor")  # no prefix caches; today's engine call; through algs.Editor


def bench_e2e(model, tok, args) -> None:
    """Per case: pre and post evaluation plus the edit, EMMET on the embedded model, in three modes measured in
    this run: the baseline (no prefix caches), the engine called directly (distribute.apply_to_model with its
    own state, as the CLI did before the Editor) and the Editor (what the CLI runs now)."""
    from algs import Editor, algorithm
    from algs.distribute import EditOptions, apply_to_model, put_weights
    from experiments.metrics.counterfact import counterfact_metrics_many

    editor = Editor(model, tok, "EMMET", REPO_ROOT / "hparams" / "EMMET" / "smollm2-135m.json", seed=args.seed)
    hp = editor.hparams
    hp.mom2_dataset = args.corpus
    with tempfile.TemporaryDirectory() as stats_dir:
        editor.options = EditOptions(seed=args.seed, stats_dir=stats_dir)
        started = time.perf_counter()
        editor.prepare()  # templates and C0, shared by every mode
        prepare_seconds = time.perf_counter() - started
        objective = functools.partial(algorithm("EMMET").objective, hp)

        def edit(mode, chunk):
            if mode == "Editor":
                return editor.edit(chunk)["batches"][0]["phase_seconds"]
            options = EditOptions(seed=args.seed, stats_dir=stats_dir, prefix_cache=mode == "engine")
            report = apply_to_model(model, tok, [request_of(r) for r in chunk], hp, objective, editor.state, options)
            editor.state.edits.clear()
            return report["batches"][0]["phase_seconds"]

        rows = []
        for batch in args.e2e_batches:
            n_cases = args.e2e_cases if batch == 1 else batch
            records = rome_schema_records(args.data_dir, n_cases)
            totals = {}
            for mode in E2E_MODES:
                phases = {"targets": 0.0, "keys": 0.0, "solve": 0.0, "other edit": 0.0, "evaluation": 0.0}
                for start in range(0, n_cases, batch):
                    chunk = records[start:start + batch]
                    tick = time.perf_counter()
                    counterfact_metrics_many(model, tok, chunk, share_prefixes=mode != "baseline")
                    phases["evaluation"] += time.perf_counter() - tick
                    tick = time.perf_counter()
                    edit_phases = edit(mode, chunk)
                    edit_seconds = time.perf_counter() - tick
                    for name, seconds in edit_phases.items():
                        key = name if name in phases else "other edit"
                        phases[key] += seconds
                        edit_seconds -= seconds
                    phases["other edit"] += edit_seconds
                    tick = time.perf_counter()
                    counterfact_metrics_many(model, tok, chunk, share_prefixes=mode != "baseline")
                    phases["evaluation"] += time.perf_counter() - tick
                    put_weights(model, editor.state.original_weights)
                totals[mode] = phases
            for mode in E2E_MODES:
                phases = totals[mode]
                edit_total = sum(v for k, v in phases.items() if k != "evaluation")
                rows.append([f"batch {batch}, {mode}", *(phases[k] / n_cases for k in phases), edit_total / n_cases,
                             sum(phases.values()) / n_cases])
            edit_time = {mode: sum(v for k, v in totals[mode].items() if k != "evaluation") for mode in E2E_MODES}
            total = {mode: sum(totals[mode].values()) for mode in E2E_MODES}
            rows.append([f"batch {batch}: baseline / engine", "", "", "", "", "", edit_time["baseline"] /
                         edit_time["engine"], total["baseline"] / total["engine"]])
            rows.append([f"batch {batch}: Editor / engine", "", "", "", "", "", edit_time["Editor"] / edit_time["engine"],
                         total["Editor"] / total["engine"]])
    print_table(f"e2e: EMMET on smollm2-135m, seconds per case (pre + post evaluation, edit); templates and C0 "
                f"prepared once in {prepare_seconds:.1f} s (statistics cached)",
                ["run", "targets", "keys", "solve", "other edit", "evaluation", "edit", "total"], rows)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"benchmark: sections {','.join(args.only)}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s); all figures measured in this run")
    try:
        model = tok = None
        if {"stats", "multilayer", "targets", "prefix", "eval", "generation", "e2e"} & set(args.only):
            model, tok = load_model(args.model, device=args.device)
        if "stats" in args.only:
            bench_stats(model, tok, args)
        if "multilayer" in args.only:
            bench_multilayer(model, tok, args)
        if "solver" in args.only:
            bench_solver(args)
        if "targets" in args.only:
            bench_targets(model, tok, args)
        if "prefix" in args.only:
            bench_prefix(model, tok, args)
        if "eval" in args.only:
            bench_eval(model, tok, args)
        if "generation" in args.only:
            bench_generation(model, tok, args)
        if "e2e" in args.only:
            bench_e2e(model, tok, args)
    except (ValueError, RuntimeError, OSError) as error:  # bad input: a message, not a traceback
        raise SystemExit(f"benchmark: {error}")
    print(f"\ntotal wall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
