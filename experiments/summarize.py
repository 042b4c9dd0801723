"""Summaries of edit runs: a table per run of every metric before and after the edit, CSV/JSON rows,
and metric-against-batch-size plots in the style of the EMMET and FastMEMIT papers' figures.

Per-case scores come from the metrics modules (counterfact_case_scores, zsre_case_scores); this file
only averages them. Every metric value in a summary is 100 × the per-case value: ES/PS/NS and EM/PM/NM
in %, GE the n-gram entropy (generation.py's reference scale) × 100 (unedited GPT-2 XL ≈ 626), RS the
tf-idf cosine × 100. Spread is the population standard deviation over cases (as np.std in the
references). S = harmonic mean of the mean ES, PS and NS (SPEC §6).

Sequential (lifelong) runs also get a table per checkpoint (number of edits → post ES/PS/NS of the cases
edited so far, their retention ES/PS/NS re-scored at that point, each downstream metric, perplexity, the
largest ‖W_t − W_0‖_F) and a plot of those against the number of edits, one line per run. "final" (every
case on the model after the last batch) is summarized beside pre and post.

Usage: python experiments/summarize.py RUN [RUN ...] [--csv F] [--json F] [--plot F.png] [--first_n_cases N]
"""
import argparse
import csv
import json
import os
import re
import statistics
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the packages beside this file, never another checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dsets import DATASETS
from experiments.metrics import Evaluation
from experiments.metrics.counterfact import harmonic_mean
from experiments.run_store import WEIGHT_NORMS_FILE, read_jsonl
from util.errors import InputError, report
from util.io import atomic_path, write_json_atomic

PROG = "summarize"
SCALE = 100
# Teacher-forced scores beside their generation-based counterparts (SPEC §11), then the rest.
METRICS = ("ES", "GES", "PS", "GPS", "NS", "GNS", "EM", "PM", "NM", "GE", "RS", "multihop", "multihop_original",
           "single_hop")
SCORE_PARTS = ("ES", "PS", "NS")
GENERATED_PARTS = ("GES", "GPS", "GNS")
SCORES = {"S": SCORE_PARTS, "GS": GENERATED_PARTS}  # harmonic means: teacher-forced S, generation-based GS
SIDES = ("pre", "post", "final")  # final: sequential runs only, on the model after the last batch
SCALE_NOTES = {
    "cf": "values ×100: ES/PS/NS, EM/PM/NM in %; GE = n-gram entropy ×100 (unedited GPT-2 XL ≈ 626); "
          "RS = tf-idf cosine ×100",
    "zsre": "values ×100: ES/PS/NS = token accuracy in %",
    "mquake": "values ×100: multihop = cases answering a multi-hop question with the new answer, %",
}
GENERATION_NOTE = ("G* = generation-based (greedy answer, normalised prefix match); portability_/locality_<kind>: "
                   "_acc token accuracy, _G generation-based, _unchanged greedy answer as before the edit")
PLOT_METRICS = ("ES", "PS", "NS", "S", "GE")
RUN_DIR_RE = re.compile(r"^run_\d+$")
CASE_FILE_RE = re.compile(r"^case_(\d+)\.json$")
CHECKPOINT_FILE_RE = re.compile(r"^(retention|downstream)_(\d+)edits\.json$")
DOWNSTREAM_METRICS = ("accuracy", "f1", "mcc")


class RunError(ValueError):
    """A run directory that cannot be summarized (no readable params.json, unknown dataset, ...)."""


class CaseError(ValueError):
    """A case file that cannot be read or scored; the run is summarized without it."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (RUN_DIR_RE.match(path.name) is not None or (path / "params.json").is_file())


def run_sort_key(path: Path):
    match = re.search(r"\d+$", path.name)
    return (str(path.parent), int(match.group()) if match else -1, path.name)


def find_runs(path) -> list[Path]:
    """The run directories a CLI argument names: itself (a run), its runs (an algorithm directory),
    or its algorithms' runs (a results root)."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path} is not a directory (expected a run, algorithm or results directory)")
    if is_run_dir(path):
        return [path]
    runs = [child for child in path.iterdir() if is_run_dir(child)]
    if not runs:
        runs = [run for alg_dir in path.iterdir() if alg_dir.is_dir()
                for run in alg_dir.iterdir() if is_run_dir(run)]
    if not runs:
        raise RunError(f"{path} holds no run directories (run_XXX with params.json)")
    return sorted(runs, key=run_sort_key)


def read_json_object(path: Path, error_class) -> dict:
    """A JSON object from `path`, or error_class naming the file and what is wrong."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise error_class(f"{path}: not readable JSON ({error})") from None
    if not isinstance(obj, dict):
        raise error_class(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_params(run_dir: Path) -> dict:
    path = run_dir / "params.json"
    params = read_json_object(path, RunError)
    if params.get("ds_name") not in DATASETS:
        raise RunError(f"{path}: 'ds_name' is {params.get('ds_name')!r}; expected one of {', '.join(DATASETS)}")
    if not isinstance(params.get("hparams", {}), dict):
        raise RunError(f"{path}: 'hparams' must be an object")
    return params


def case_files(run_dir: Path, first_n_cases=None) -> list[Path]:
    """case_<id>.json files in case-id order (the .tmp files of atomic writes never match);
    with first_n_cases, only the first N of them."""
    files = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := CASE_FILE_RE.match(p.name)))
    files = [p for _, p in files]
    return files if first_n_cases is None else files[:first_n_cases]


def read_case(path: Path, case_scores) -> dict:
    """One case: its pre and post scores, batch index and the batch's edit time."""
    case = read_json_object(path, CaseError)
    scores = {}
    for side in SIDES:
        if side == "final" and side not in case:
            continue
        if not isinstance(case.get(side), dict):
            raise CaseError(f"{path}: no {side!r} metrics object")
        try:
            scores[side] = case_scores(case[side])
        except (TypeError, KeyError, ValueError) as error:
            raise CaseError(f"{path}: {side!r} metrics do not have the expected structure ({error!r})") from None
    return {**scores, "case_id": case.get("case_id"), "batch": case.get("batch"), "edit_time": case.get("edit_time"),
            "num_edits": case.get("num_edits"), "sequential": case.get("sequential")}


def metric_stats(scores: list[dict], side: str) -> dict:
    """{side}_{metric}_mean/_std/_n over the cases that have the metric (×SCALE), and {side}_S."""
    present = {name for case in scores for name in case}
    names = [m for m in METRICS if m in present] + sorted(present - set(METRICS))
    row = {}
    for name in names:
        values = [SCALE * case[name] for case in scores if name in case]
        row[f"{side}_{name}_mean"] = statistics.fmean(values)
        row[f"{side}_{name}_std"] = statistics.pstdev(values)
        row[f"{side}_{name}_n"] = len(values)
    for score, parts in SCORES.items():
        if all(f"{side}_{m}_mean" in row for m in parts):
            row[f"{side}_{score}"] = harmonic_mean(row[f"{side}_{m}_mean"] for m in parts)
    return row


def edit_times(cases: list[dict]) -> dict:
    """Mean and total edit time over the batches seen (cases of one batch share its edit time)."""
    per_batch = {case["batch"]: case["edit_time"] for case in cases
                 if case["batch"] is not None and isinstance(case["edit_time"], (int, float))}
    if not per_batch:
        return {}
    return {"batches": len(per_batch), "edit_time_mean": statistics.fmean(per_batch.values()),
            "edit_time_total": sum(per_batch.values())}


def first_known(cases: list[dict], key: str, fallback):
    return next((case[key] for case in cases if case[key] is not None), fallback)


def summarize_run(run_dir, first_n_cases=None) -> dict:
    """One flat dict per run: descriptors, case counts, edit times, and every metric's pre/post stats."""
    run_dir = Path(run_dir)
    params = read_params(run_dir)
    case_scores = Evaluation(DATASETS[params["ds_name"]].kind).scores
    cases, unparseable = [], 0
    for path in case_files(run_dir, first_n_cases):
        try:
            cases.append(read_case(path, case_scores))
        except CaseError as error:
            warn(f"skipping {error}")
            unparseable += 1
    hparams, args = params.get("hparams", {}), params.get("args") or {}
    expected = params.get("num_cases")
    if isinstance(expected, int) and first_n_cases is not None:
        expected = min(expected, first_n_cases)
    summary = {
        "run_dir": str(run_dir),
        "alg": params.get("alg_name"),
        "model": params.get("model_name"),
        "hparams": Path(params["hparams_fname"]).name if params.get("hparams_fname") else None,
        "ds_name": params["ds_name"],
        "dynamic": bool(hparams.get("dynamic", False)),
        "dynamic_multiplier": hparams.get("dynamic_multiplier") if hparams.get("dynamic") else None,
        "num_edits": first_known(cases, "num_edits", args.get("num_edits")),
        "sequential": first_known(cases, "sequential", args.get("sequential")),
        "status": params.get("status", "unknown"),
        "total_seconds": params.get("total_seconds"),
        "cases": len(cases),
        "cases_expected": expected,
        "cases_missing": max(0, expected - len(cases) - unparseable) if isinstance(expected, int) else None,
        "cases_unparseable": unparseable,
        **edit_times(cases),
    }
    for side in SIDES:
        summary.update(metric_stats([case[side] for case in cases if side in case], side))
    if summary["sequential"]:
        summary["checkpoints"] = sequential_checkpoints(run_dir, cases)
        summary["distance_curve"] = [
            [line["num_edits_done"], max(m["distance_from_initial"] for m in line["matrices"].values())]
            for line in read_jsonl(run_dir / WEIGHT_NORMS_FILE) if line.get("matrices")]
    return summary


# ---------------------------------------------------------------- sequential runs

def mean_scores(scores: list[dict], prefix: str) -> dict:
    """{prefix_ES: mean ×100, ...} over cases for ES/PS/NS and GES/GPS/GNS, and prefix_S / prefix_GS, their
    harmonic means."""
    row = {}
    for score, parts in SCORES.items():
        for name in parts:
            values = [SCALE * case[name] for case in scores if name in case]
            if values:
                row[f"{prefix}_{name}"] = statistics.fmean(values)
        if all(f"{prefix}_{name}" in row for name in parts):
            row[f"{prefix}_{score}"] = harmonic_mean(row[f"{prefix}_{name}"] for name in parts)
    return row


def sequential_checkpoints(run_dir: Path, cases: list[dict]) -> list[dict]:
    """One row per number of edits with a retention or downstream file (and the end of the run): post and
    retention ES/PS/NS of the cases edited so far, downstream metrics ×100, perplexity, max ‖W_t − W_0‖_F."""
    by_batch = sorted((c for c in cases if isinstance(c["batch"], int)), key=lambda c: c["batch"])
    edits_after_batch, count = {}, 0
    for case in by_batch:
        count += 1
        edits_after_batch[case["batch"]] = count
    norms = {line["num_edits_done"]: line for line in read_jsonl(run_dir / WEIGHT_NORMS_FILE)}
    rows = {}
    for path in run_dir.iterdir():
        match = CHECKPOINT_FILE_RE.match(path.name)
        if not match:
            continue
        try:
            checkpoint = read_json_object(path, CaseError)
        except CaseError as error:
            warn(f"skipping {error}")
            continue
        row = rows.setdefault(int(match.group(2)), {})
        if match.group(1) == "retention":
            row.update(mean_scores(list(checkpoint.get("cases", {}).values()), "retention"))
            row["retention_seconds"] = checkpoint.get("seconds")
            continue
        for task, result in checkpoint.get("tasks", {}).items():
            row.update({f"{task}_{metric}": SCALE * result[metric] for metric in DOWNSTREAM_METRICS
                        if isinstance(result.get(metric), (int, float))})
        row["perplexity"] = checkpoint.get("perplexity", {}).get("value")
        row["health_seconds"] = checkpoint.get("seconds")
    finals = [case["final"] for case in cases if "final" in case]
    if finals and len(finals) == len(cases):  # the end of the run: "final" is the retention of every case
        rows.setdefault(len(cases), {}).update(mean_scores(finals, "retention"))
    table = []
    for edits in sorted(rows):
        edited = [case["post"] for case in by_batch if edits_after_batch[case["batch"]] <= edits]
        row = {"edits": edits, **mean_scores(edited, "post"), **rows[edits]}
        distances = [m["distance_from_initial"] for m in norms.get(edits, {}).get("matrices", {}).values()]
        if distances:
            row["max_distance_from_initial"] = max(distances)
        table.append(row)
    return table


def format_checkpoints(summary: dict) -> str:
    """The printed table of a sequential run's checkpoints (empty when it has none)."""
    checkpoints = summary.get("checkpoints") or []
    if not checkpoints:
        return ""
    tasks = []
    for row in checkpoints:
        tasks += [key[:-len("_accuracy")] for key in row if key.endswith("_accuracy") and
                  key[:-len("_accuracy")] not in tasks]
    generated = any("retention_GES" in row for row in checkpoints)
    header = ["edits", "post ES/PS/NS", "retention ES/PS/NS (S)", *(["retention GES/GPS/GNS (GS)"] * generated),
              *(f"{t} acc/F1/MCC" for t in tasks), "ppl", "max|W-W0|"]

    def triple(row, prefix, names):
        if not any(f"{prefix}{n}" in row for n in names):
            return "-"
        return "/".join(f"{row[f'{prefix}{n}']:.1f}" if f"{prefix}{n}" in row else "-" for n in names)

    def retention(row, score):
        text = triple(row, "retention_", SCORES[score])
        return text + (f" ({row[f'retention_{score}']:.1f})" if f"retention_{score}" in row else "")

    lines = [header]
    for row in checkpoints:
        ppl = row.get("perplexity")
        distance = row.get("max_distance_from_initial")
        lines.append([str(row["edits"]), triple(row, "post_", SCORE_PARTS), retention(row, "S"),
                      *([retention(row, "GS")] * generated), *(triple(row, f"{t}_", DOWNSTREAM_METRICS) for t in tasks),
                      "-" if ppl is None else f"{ppl:.2f}", "-" if distance is None else f"{distance:.3f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["sequential checkpoints (ES/PS/NS and downstream ×100; ppl = WikiText-2 perplexity; "
            "max|W-W0| = largest Frobenius distance of an edited matrix from the unedited one):"]
    text += ["  " + "  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines]
    return "\n".join(text)


def metric_names(summary: dict) -> list[str]:
    """Metric names with stats in the summary, in METRICS order (then any others)."""
    names = []
    for key in summary:
        side, _, rest = key.partition("_")
        if side in SIDES and rest.endswith("_mean") and rest[:-5] not in names:
            names.append(rest[:-5])
    return [m for m in METRICS if m in names] + [m for m in names if m not in METRICS]


def mean_std(summary: dict, side: str, name: str) -> str:
    if f"{side}_{name}_mean" not in summary:
        return "-"
    return f"{summary[f'{side}_{name}_mean']:.2f} ± {summary[f'{side}_{name}_std']:.2f}"


def format_seconds(value) -> str:
    return "-" if value is None else f"{value:.2f} s"


def format_table(summary: dict) -> str:
    """The printed per-run table: descriptors, then one row per metric with pre and post mean ± std."""
    fast = (f"dynamic, multiplier {summary['dynamic_multiplier']}" if summary["dynamic"]
            else "off (full statistics)")
    counts = f"cases {summary['cases']}"
    if summary["cases_expected"] is not None:
        counts += f" of {summary['cases_expected']} (missing {summary['cases_missing']}"
    else:
        counts += " (of ? expected"
    counts += f", unparseable {summary['cases_unparseable']})"
    edit = "edit time -"
    if "edit_time_mean" in summary:
        edit = (f"edit time {summary['edit_time_mean']:.2f} s per batch, "
                f"{summary['edit_time_total']:.2f} s total over {summary['batches']} batches")
    lines = [
        f"== {summary['run_dir']} [{summary['status']}] ==",
        f"alg {summary['alg']} | model {summary['model']} | hparams {summary['hparams']} | "
        f"dataset {summary['ds_name']} | num_edits {summary['num_edits']} | sequential {summary['sequential']}",
        f"FastMEMIT statistics cap: {fast}",
        f"{counts} | {edit} | run wall time {format_seconds(summary['total_seconds'])}",
        f"{SCALE_NOTES[DATASETS[summary['ds_name']].kind]}; mean ± std over cases",
    ]
    if any(name.startswith(("G", "portability_", "locality_")) and name != "GE" for name in metric_names(summary)):
        lines.append(GENERATION_NOTE)
    names = metric_names(summary)
    if not names:
        return "\n".join(lines + ["  no scored cases"])
    sides = [side for side in SIDES if side != "final" or any(k.startswith("final_") for k in summary)]
    rows = [("metric", *sides, "n")]
    for name in names:
        n = summary.get(f"post_{name}_n", summary.get(f"pre_{name}_n"))
        rows.append((name, *(mean_std(summary, side, name) for side in sides), str(n)))
    for score, parts in SCORES.items():
        if any(f"{side}_{score}" in summary for side in sides):
            rows.append((score, *(f"{summary[f'{side}_{score}']:.2f}" if f"{side}_{score}" in summary else "-"
                                  for side in sides), f"harmonic mean of {', '.join(parts)} means"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(sides) + 1)]
    for row in rows:
        cells = [f"{row[0]:<{widths[0]}}"] + [f"{cell:>{width}}" for cell, width in zip(row[1:-1], widths[1:])]
        lines.append("  " + "  ".join(cells) + f"  {row[-1]}")
    if "final" in sides:
        lines.append("  final: every case re-scored on the model after the last batch (retention)")
    checkpoints = format_checkpoints(summary)
    return "\n".join(lines + ([checkpoints] if checkpoints else []))


LIST_KEYS = ("checkpoints", "distance_curve")  # a sequential run's curves: in the JSON, not in the run CSV


def table_columns(rows: list[dict]) -> list[str]:
    columns = []
    for row in rows:
        columns += [key for key in row if key not in columns and key not in LIST_KEYS]
    return columns


def write_csv(rows: list[dict], path) -> None:
    """One line per row; written to a temporary file and renamed, so a reader never sees half a table."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=table_columns(rows), restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def checkpoint_rows(summaries: list[dict]) -> list[dict]:
    """Every sequential run's checkpoint rows, each with its run's descriptors (for the checkpoints CSV)."""
    return [{"run_dir": s["run_dir"], "alg": s["alg"], "model": s["model"], "num_edits": s["num_edits"], **row}
            for s in summaries for row in s.get("checkpoints") or []]


def sibling_path(path, suffix: str) -> Path:
    """out.csv -> out_<suffix>.csv."""
    path = Path(path)
    return path.with_name(f"{path.stem}_{suffix}{path.suffix}")


def line_label(summary: dict, several_models: bool, several_datasets: bool) -> str:
    """One plotted line per algorithm; FastMEMIT variants apart, labelled with their multiplier."""
    label = summary["alg"] or "?"
    if summary["dynamic"]:
        label += f" (dynamic ×{summary['dynamic_multiplier']:g})"
    if summary["sequential"]:
        label += ", sequential"
    if several_models:
        label += f", {summary['model']}"
    if several_datasets:
        label += f", {summary['ds_name']}"
    return label


def plot_value_key(name: str) -> str:
    return "post_S" if name == "S" else f"post_{name}_mean"


def plot_series(summaries: list[dict]) -> dict:
    """{label: {num_edits: [summaries]}} for the runs that have a batch size."""
    several_models = len({s["model"] for s in summaries}) > 1
    several_datasets = len({s["ds_name"] for s in summaries}) > 1
    series = {}
    for summary in summaries:
        if not isinstance(summary["num_edits"], int):
            warn(f"{summary['run_dir']}: no num_edits known, left out of the plot")
            continue
        label = line_label(summary, several_models, several_datasets)
        series.setdefault(label, {}).setdefault(summary["num_edits"], []).append(summary)
    return series


def plot_runs(summaries: list[dict], path) -> Figure:
    """Post-edit ES, PS, NS, S (and GE when any run has it) against num_edits on a log2 axis, one
    subplot per metric; runs sharing a line and batch size are averaged and the point says so."""
    series = plot_series(summaries)
    names = [m for m in PLOT_METRICS if any(plot_value_key(m) in s for s in summaries)]
    if not series or not names:
        raise RunError("nothing to plot: no run has both num_edits and post-edit scores")
    batch_sizes = sorted({num_edits for by_batch in series.values() for num_edits in by_batch})
    fig = Figure(figsize=(4 * len(names), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    averaged = False
    for index, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), index + 1)
        key = plot_value_key(name)
        for label, by_batch in series.items():
            points = []
            for num_edits in sorted(by_batch):
                values = [s[key] for s in by_batch[num_edits] if key in s]
                if values:
                    points.append((num_edits, statistics.fmean(values), len(values)))
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            for x, y, count in points:
                if count > 1:
                    averaged = True
                    ax.annotate(f"avg of {count}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size (num_edits)")
        ax.set_title(f"post-edit {name}" + (" (×100)" if name == "GE" else " (%)"))
        ax.grid(True, alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    if averaged:
        fig.suptitle("points marked 'avg of k' are the mean of k runs with the same line and batch size",
                     fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return fig


def plot_lifelong(summaries: list[dict], path) -> Figure:
    """The lifelong papers' figures: retention ES/PS/NS/S (and the generation-based GES/GPS/GNS/GS: the
    forgetting curve of what the model says), each downstream task's F1, perplexity and the largest
    ‖W_t − W_0‖_F against the number of edits, one line per sequential run."""
    runs = [s for s in summaries if s.get("checkpoints") or s.get("distance_curve")]
    if not runs:
        raise RunError("nothing to plot: no sequential run has checkpoints")
    keys = [f"retention_{name}" for name in (*SCORE_PARTS, "S", *GENERATED_PARTS, "GS")]
    keys = [k for k in keys if any(k in row for s in runs for row in s["checkpoints"])]
    tasks = []
    for s in runs:
        for row in s["checkpoints"]:
            tasks += [k for k in row if k.endswith("_f1") and k not in tasks]
    keys += tasks + ["perplexity"] * any("perplexity" in row for s in runs for row in s["checkpoints"])
    panels = keys + ["distance_curve"] * any(s.get("distance_curve") for s in runs)
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(4 * columns, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    labels = {id(s): f"{s['alg']} ({s['num_edits']}/batch), {Path(s['run_dir']).name}" for s in runs}
    for index, key in enumerate(panels):
        ax = fig.add_subplot(rows, columns, index + 1)
        for s in runs:
            if key == "distance_curve":
                points = s.get("distance_curve") or []
            else:
                points = [(row["edits"], row[key]) for row in s["checkpoints"]
                          if isinstance(row.get(key), (int, float))]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None,
                        label=labels[id(s)])
        title = {"distance_curve": "max ‖W_t − W_0‖_F (per batch)", "perplexity": "WikiText-2 perplexity"}.get(
            key, key.replace("retention_", "retention ").replace("_f1", " macro-F1") + " (%)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("number of edits")
        ax.grid(True, alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return fig


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Summarize edit runs: per-run tables of every metric pre/post edit (values ×100), "
                    "optional CSV/JSON rows and a metrics-vs-batch-size plot.")
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a run directory (results/EMMET/run_003), an algorithm directory (all its runs) "
                             "or a results root (every algorithm's runs)")
    parser.add_argument("--csv", help="write one row per run (every metric's pre_/post_/final_ mean, std, n; S; "
                                      "run descriptors) to this CSV file; sequential runs' checkpoint rows go to "
                                      "<name>_checkpoints.csv beside it")
    parser.add_argument("--json", help="write the same rows as a JSON list of objects to this file")
    parser.add_argument("--plot", help="write a PNG of post-edit ES/PS/NS/S (and GE) against num_edits, "
                                       "one line per algorithm / FastMEMIT variant; for sequential runs: retention, "
                                       "downstream F1, perplexity and max ‖W_t − W_0‖ against the number of edits, "
                                       "one line per run (to <name>_lifelong.png when batched runs are plotted too)")
    parser.add_argument("--first_n_cases", type=positive_int,
                        help="summarize only the first N case files of each run (in case-id order)")
    return parser.parse_args(argv)


def check_output_path(path, flag: str) -> None:
    """An output file can be written: not a directory, and its nearest existing folder writable (checked
    before any run is read, so a typo costs nothing)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{path} is a directory", flag, "give a file name, e.g. out/summary" + path.suffix)
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise InputError(f"cannot write into {folder}", f"{flag} {path}", "give a path in a writable folder")


def main(argv=None) -> int:
    """Exit status: 0; 1 when a run was skipped; 2 with one line on stderr for bad input or unwritable output."""
    args = parse_args(argv)
    try:
        for flag, path in (("--csv", args.csv), ("--json", args.json), ("--plot", args.plot)):
            if path:
                check_output_path(path, flag)
        return summarize_and_write(args)
    except (RunError, InputError) as error:
        return report(PROG, error)
    except OSError as error:  # an output folder that became unwritable, a full disk
        return report(PROG, error)


def summarize_and_write(args) -> int:
    run_dirs = []
    for run in args.runs:
        run_dirs += [path for path in find_runs(run) if path not in run_dirs]
    summaries, skipped = [], 0
    for run_dir in run_dirs:
        try:
            summaries.append(summarize_run(run_dir, args.first_n_cases))
        except RunError as error:
            warn(f"skipping run: {error}")
            skipped += 1
            continue
        print(format_table(summaries[-1]), end="\n\n")
    if not summaries:
        return report(PROG, "no run could be summarized (see the warnings above)", 1)
    if args.csv:
        write_csv(summaries, args.csv)
        print(f"wrote {args.csv}")
        if checkpoint_rows(summaries):
            write_csv(checkpoint_rows(summaries), sibling_path(args.csv, "checkpoints"))
            print(f"wrote {sibling_path(args.csv, 'checkpoints')}")
    if args.json:
        write_json_atomic(args.json, summaries)
        print(f"wrote {args.json}")
    if args.plot:
        sequential = [s for s in summaries if s.get("checkpoints") or s.get("distance_curve")]
        batched = [s for s in summaries if s not in sequential]
        plots = []  # sequential runs: against the number of edits; batched ones: against the batch size
        if sequential:
            plots.append((plot_lifelong, sequential, args.plot if not batched else sibling_path(args.plot, "lifelong")))
        if batched:
            plots.append((plot_runs, batched, args.plot))
        for plot, runs, path in plots:
            try:
                plot(runs, path)
            except RunError as error:
                report(PROG, error)
                return 1
            print(f"wrote {path}")
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
