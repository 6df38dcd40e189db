"""``benchmarks/results/summary.md``: every committed benchmark result, as tables, generated.

    python -m benchmarks.summary                 # rewrites benchmarks/results/summary.md
    python -m benchmarks.summary --check         # exit 1 if the committed summary is stale

The JSON files under ``benchmarks/results/`` are the measurements; this page is their one
readable form, so that the README and the docs link to it (or quote a file by name) instead
of keeping hand-typed copies. Each table names its file, the machine and the date it records.
A test (tests/test_benchmark_summary.py) fails when a result was added without regenerating it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
SUMMARY = RESULTS / "summary.md"


def fmt(value, spec: str = ".2f") -> str:
    """A number as ``spec``, ``-`` for a missing one."""
    return "-" if value is None else format(value, spec)


def table(header: Sequence[str], rows: List[Sequence[str]], right_from: int = 1) -> List[str]:
    """A Markdown table; columns from ``right_from`` on are right-aligned (numbers)."""
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def machine(record: Dict) -> str:
    """``<device name>, <date>``: what the file says it ran on."""
    env = record.get("environment", {})
    return f"{env.get('device_name') or env.get('cpu') or env.get('device', '?')}, {str(env.get('date', '?'))[:10]}"


def heading(path: Path, record: Dict) -> List[str]:
    return [f"`{path.name}` ({machine(record)})", ""]


# --------------------------------------------------------------------------- one section per suite
def train_loop(path: Path, record: Dict) -> List[str]:
    rows = record["rows"]
    names = {"speedup_vs_eager": "compiled vs eager", "page_faults_per_step": "faults / step",
             "peak_rss_mb": "peak RSS (MB)"}
    extra = [key for key in names if any(key in r for r in rows)]
    header = ["model", "run", "sparsity", "ms / step (min-max)", "vs dense", "parameters"] + [names[k] for k in extra]
    body = [[r["model"], r["run"], fmt(r["sparsity"]), f"{r['ms_per_step']:.1f} ({r['min_ms']:.0f}-{r['max_ms']:.0f})",
             f"{r['speedup_vs_dense']:.2f}x", f"{r['parameters']:,}"]
            + [fmt(r.get(key), ".2f" if key == "speedup_vs_eager" else ".0f") for key in extra] for r in rows]
    parameters = record["parameters"]
    blocks = parameters.get("block_sizes", [parameters.get("block_size")])
    note = (f"batch {parameters.get('batch_size')}, blocks of {', '.join(map(str, blocks))}, "
            f"{parameters.get('rounds')} rounds of {parameters.get('steps')} steps, median per step")
    return heading(path, record) + [note, ""] + table(header, body, right_from=2)


def ddp_scaling(path: Path, record: Dict) -> List[str]:
    body = [[r["method"], fmt(r["sparsity"]), f"{r['processes']} x {r['threads_per_process']}",
             f"{r['ms_per_step']:.1f} ({r['min_ms']:.0f}-{r['max_ms']:.0f})", f"{r['speedup_vs_1_process']:.2f}x"]
            for r in record["rows"]]
    header = ["method", "sparsity", "processes x threads", "ms / step (min-max)", "vs 1 process"]
    return heading(path, record) + table(header, body)


def time_per_live_mac(rows: List[Dict], product: str = "") -> float:
    """Our time over the masked-dense time scaled by each layer's density, summed over ``rows``
    (benchmarks.layers rows) for one product (``fwd``, ``grad_input``, ``grad_weight``; all three by
    default): 1.0 = as fast per live weight as dense."""
    key = f"_{product}_ms" if product else "_ms"
    return sum(r[f"sparse{key}"] for r in rows) / sum(r["density"] * r[f"dense{key}"] for r in rows)


def layers(path: Path, record: Dict) -> List[str]:
    groups: Dict[tuple, List[Dict]] = defaultdict(list)
    block = record["parameters"].get("block_size")
    for r in record["rows"]:
        groups[(r["model"], r["sparsity"], str(r.get("block_size", block)))].append(r)
    body = []
    for (model, sparsity, blocks), rows in sorted(groups.items()):
        sparse, dense = sum(r["sparse_ms"] for r in rows), sum(r["dense_ms"] for r in rows)
        per_mac = [time_per_live_mac(rows, p) for p in ("fwd", "grad_input", "grad_weight")]
        body.append([model, fmt(sparsity), blocks, str(len(rows)), f"{sparse:.1f}", f"{dense:.1f}",
                     f"{sparse / dense:.2f}", " / ".join(f"{v:.2f}" for v in per_mac)])
    header = ["model", "sparsity", "blocks", "layers", "sparse ms (fwd+bwd)", "masked-dense ms", "ratio",
              "time per live MAC vs dense (fwd / grad-in / grad-w)"]
    note = ("every block-sparse layer of a training step, ours against dense kernels on its masked weight; "
            "per MAC, 1.00 = as fast per live weight as dense, lower is better")
    return heading(path, record) + [note, ""] + table(header, body)


def layer_call(path: Path, record: Dict) -> List[str]:
    body = [[r["case"], fmt(r["density"]), f"{r['sparse_us']:.0f}", f"{r['dense_us']:.0f}", f"{r['sparse_vs_dense']:.2f}"]
            for r in record["rows"]]
    return heading(path, record) + table(["case", "density", "sparse us", "dense us", "sparse / dense"], body)


def large_layers(path: Path, record: Dict) -> List[str]:
    """Time as a fraction of dense's, per shape, method and pass, one column per density."""
    densities = sorted({r["density"] for r in record["rows"]}, reverse=True)
    p = record["parameters"]
    linear_shape = f"x [{p.get('tokens')}, {p.get('in_features')}], W [{p.get('out_features')}, {p.get('in_features')}]"
    cells: Dict[tuple, Dict[float, Optional[float]]] = defaultdict(dict)
    for r in record["rows"]:
        if r["method"] != "dense":
            key = (r.get("shape", linear_shape), r["block"], r["method"], r["pass"])
            cells[key][r["density"]] = r.get("vs_dense")
    header = ["shape", "block", "method", "pass"] + [f"density {d:g}" for d in densities]
    body = [[*map(str, key)] + [fmt(values.get(d)) for d in densities] for key, values in cells.items()]
    note = "time as a fraction of dense's in the same run (" + ", ".join(
        f"{k} {v}" for k, v in record["parameters"].items() if k not in ("densities", "blocks", "shapes")) + ")"
    return heading(path, record) + [note, ""] + table(header, body, right_from=4)


def masks(path: Path, record: Dict) -> List[str]:
    body = [[r["method"], f"{r['ms']:.1f}", f"{r['speedup_vs_reference']:.1f}x"] for r in record["rows"]]
    p = record["parameters"]
    note = (f"one whole-model update: {p.get('layers')} layers, {p.get('blocks_total'):,} blocks, "
            f"density {p.get('density')}, {p.get('drop_fraction')} moved")
    return heading(path, record) + [note, ""] + table(["method", "ms", "vs pure torch"], body)


def train_step(path: Path, record: Dict) -> List[str]:
    body = [[fmt(r["sparsity"]), str(r["block"] or "-"), f"{r['amortised_step_ms']:.1f}", f"{r['speedup_vs_dense']:.2f}x",
             f"{r['state_vs_dense']:.2f}"] for r in record["rows"]]
    header = ["sparsity", "block", "ms / step (amortised)", "vs dense", "training state vs dense"]
    return heading(path, record) + table(header, body)


def page_faults(path: Path, record: Dict) -> List[str]:
    body = [[r["malloc"], r["model"], r["run"], f"{r['faults_per_step']:.0f}", f"{r['faults_min']:.0f}-{r['faults_max']:.0f}",
             str(r["processes"])] for r in record["rows"]]
    header = ["malloc", "model", "run", "faults / step (median)", "range over processes", "processes"]
    return heading(path, record) + table(header, body, right_from=3)


def group_norm_silu(path: Path, record: Dict) -> List[str]:
    body = [[r["model"], r["shape"], str(r["groups"]), f"{r['torch_ms']:.2f}", f"{r['fused_ms']:.2f}",
             f"{r['fused_vs_torch']:.2f}"] for r in record["rows"]]
    header = ["model", "shape (channels-last)", "groups", "torch ms", "fused ms", "fused / torch"]
    return heading(path, record) + ["forward + backward"] + [""] + table(header, body, right_from=2)


def sampling(path: Path, record: Dict) -> List[str]:
    body = [[r["model"], r["path"], str(r["batch"]), fmt(r["sparsity"]), f"{r['ms']:.0f}", f"{r['ms_per_image']:.1f}",
             f"{r['speedup_vs_dense']:.2f}x"] for r in record["rows"]]
    header = ["model", "path", "batch", "sparsity", "ms", "ms / image", "vs dense"]
    note = f"{record['parameters'].get('steps')} DDIM steps; sample: sparse-diffusion sample's path; export: a --sparse export via sd.load_pretrained"
    return heading(path, record) + [note, ""] + table(header, body, right_from=2)


# suite name (the JSON's "suite") -> (section title, renderer)
SECTIONS: Dict[str, tuple] = {
    "train_loop": ("The training loop (`benchmarks.train_loop`)", train_loop),
    "ddp_scaling": ("Data parallel on one machine (`benchmarks.ddp_scaling`)", ddp_scaling),
    "layers": ("Every layer of a step (`benchmarks.layers`)", layers),
    "layer_call": ("One small layer's call (`benchmarks.layer_call`)", layer_call),
    "linear": ("Large linear layers (`benchmarks.linear`)", large_layers),
    "conv2d": ("Large convolutions (`benchmarks.conv2d`)", large_layers),
    "conv": ("Large convolutions, earlier runs (`benchmarks.conv2d`)", large_layers),
    "masks": ("Mask updates (`benchmarks.masks`)", masks),
    "train_step": ("A UNet training step (`benchmarks.train_step`)", train_step),
    "page_faults": ("Page faults per step, fresh processes (`benchmarks.page_faults`)", page_faults),
    "group_norm_silu": ("GroupNorm + SiLU (`benchmarks.group_norm_silu`)", group_norm_silu),
    "sampling": ("Sampling (`benchmarks.sampling`)", sampling),
}


def render(results: Path = RESULTS) -> str:
    """The whole page, from the JSON files under ``results`` (newest first in each section)."""
    sections: Dict[str, List[str]] = defaultdict(list)
    others: List[str] = []
    for path in sorted(results.glob("*.json"), reverse=True):
        record = json.loads(path.read_text())
        suite = record.get("suite") if isinstance(record, dict) else None
        if suite not in SECTIONS:
            others.append(path.name)
            continue
        render_section: Callable = SECTIONS[suite][1]
        sections[suite] += render_section(path, record) + [""]
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks.summary` from the JSON files in this folder (the measurements); "
             "do not edit by hand. Each table names its file and the machine it ran on. Ratios are against dense "
             "measured in the same run.", ""]
    gpu = sorted(p.name for p in results.glob("gpu-check-*.jsonl"))
    lines += ["GPU results (`make gpu-check`): " + (", ".join(f"`{name}`" for name in gpu) if gpu else
              "none yet: no GPU has run this code."), ""]
    for suite, (title, _) in SECTIONS.items():
        if sections[suite]:
            lines += [f"## {title}", ""] + sections[suite]
    if others:
        lines += ["## Other files", ""] + [f"- `{name}`" for name in others] + [""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder of result JSON files")
    parser.add_argument("--check", action="store_true", help="exit 1 if summary.md differs from what it would be")
    args = parser.parse_args(argv)
    text = render(args.results)
    target = args.results / "summary.md"
    if args.check:
        stale = not target.is_file() or target.read_text() != text
        if stale:
            print(f"{target} is stale: run `python -m benchmarks.summary`", file=sys.stderr)
        return 1 if stale else 0
    target.write_text(text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
