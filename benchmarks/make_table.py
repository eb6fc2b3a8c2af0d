"""Render the benchmark tables from the JSON records in benchmarks/results/ into the docs.

    python benchmarks/make_table.py                       # print the markdown of the cpu_ performance tables
    python benchmarks/make_table.py --write               # replace the block between the markers in
                                                          # docs/benchmarks/performance.md
    python benchmarks/make_table.py --prefix gpu_ --write # the same for the gpu_ records
    python benchmarks/make_table.py --multicrop --write   # the multi-crop augmentation records (kind multicrop,
                                                          # bench.py multicrop) between their own markers
    python benchmarks/make_table.py --default-run --write # the default run at five seeds
                                                          # (results/default_run_seeds.json) into README.md
                                                          # and docs/getting-started.md

Every number in the tables comes from a record written by ``python benchmarks/bench.py ... --out FILE``
(or ``benchmarks/default_run_seeds.py``); none is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS = HERE.parent / "docs"
TARGETS = (DOCS / "benchmarks" / "performance.md",)  # the performance tables (cpu_ / gpu_ records)
DEFAULT_RUN = "default_run_seeds.json"
DEFAULT_RUN_TARGETS = (HERE.parent / "README.md", DOCS / "getting-started.md")
DEFAULT_RUN_MARKERS = ("<!-- default-run:start -->", "<!-- default-run:end -->")


def markers(prefix: str):
    """cpu_ records go between <!-- performance-table:start/end -->, others (e.g. gpu_) between
    <!-- performance-table-gpu:start/end -->."""
    tag = "" if prefix == "cpu_" else "-" + prefix.rstrip("_")
    return f"<!-- performance-table{tag}:start -->", f"<!-- performance-table{tag}:end -->"


PERFORMANCE_KINDS = ("augment", "step")  # the records of the performance table (bench.py augment / step)


def multicrop_markers(prefix: str):
    """cpu_ multi-crop records go between <!-- multicrop-table:start/end -->, others (e.g. gpu_) between
    <!-- multicrop-table-gpu:start/end -->."""
    tag = "" if prefix == "cpu_" else "-" + prefix.rstrip("_")
    return f"<!-- multicrop-table{tag}:start -->", f"<!-- multicrop-table{tag}:end -->"


def load(prefix: str = "cpu_", kinds=PERFORMANCE_KINDS):
    """The bench.py records ``prefix*.json`` of the given kinds, each with its file name."""
    recs = []
    for p in sorted(RESULTS.glob(f"{prefix}*.json")):
        rec = json.loads(p.read_text())
        # another script's record sharing the prefix (e.g. cpu_data_scale.json), or another table's kind
        if rec.get("kind") not in kinds:
            continue
        rec["file"] = p.name
        recs.append(rec)
    return recs


def fmt(v, nd=1):
    return "–" if v is None else f"{v:,.{nd}f}"


def load_str(rec) -> str:
    a, b = rec.get("load_avg_start"), rec.get("load_avg_end")
    return f"{a[0]:.1f} → {b[0]:.1f}" if a and b else "?"


def results(recs, kind: str):
    """(record, result) for every result of the records of ``kind`` (augment / step)."""
    return [(rec, r) for rec in recs if rec["kind"] == kind for r in rec["results"]]


def augment_table(recs) -> str:
    rows = ["| file | threads | size px | batch | ssl_sphere views/s | ssl_sphere hue yiq views/s "
            "| kornia_stock views/s | torchvision_cpu views/s | ssl_sphere / kornia | ssl_sphere / torchvision "
            "| load avg (1 min) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec, r in results(recs, "augment"):
        thr = rec["machine"].get("torch_threads")
        v = r["views_per_s"]
        ours = v.get("ssl_sphere")
        up = lambda k: f"{ours / v[k]:.1f}x" if ours and v.get(k) else "–"  # noqa: E731
        others = " | ".join(fmt(v.get(k)) for k in ("ssl_sphere_yiq", "kornia_stock", "torchvision_cpu"))
        rows.append(f"| `{rec['file']}` | {thr} | {r['image_size']} | {r['batch']} | {fmt(ours)} | {others} | "
                    f"{up('kornia_stock')} | {up('torchvision_cpu')} | {load_str(rec)} |")
    return "\n".join(rows)


def multicrop_table(recs) -> str:
    rows = ["| file | threads | global px | local px | local crops | batch | ssl_sphere views/s "
            "| lightly DINOTransform views/s | ssl_sphere / lightly | load avg (1 min) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for rec, r in results(recs, "multicrop"):
        v = r["views_per_s"]
        ours, ref = v.get("ssl_sphere"), v.get("lightly_dino_cpu")
        rows.append(f"| `{rec['file']}` | {rec['machine'].get('torch_threads')} | {r['image_size']} | "
                    f"{r.get('local_size') or '–'} | {r['local_crops']} | {r['batch']} | {fmt(ours)} | {fmt(ref)} | "
                    f"{f'{ours / ref:.1f}x' if ours and ref else '–'} | {load_str(rec)} |")
    return "\n".join(rows)


def label(r) -> str:
    """method [+SEC] [bf16] [channels_last] [compile]: what the step ran with."""
    flags = [("+SEC", r.get("sec")), ("bf16", r.get("precision") == "bf16"),
             ("channels_last", r.get("channels_last")), ("compile", r.get("compile"))]
    return " ".join([r["method"]] + [name for name, on in flags if on])


def step_table(recs) -> str:
    rows = ["| file | method | backbone | batch | size | threads | ssl_sphere views/s | backbone-only views/s | ratio "
            "| backbone + EMA fwd views/s | ratio vs EMA floor | lightly views/s | ssl_sphere / lightly "
            "| load avg (1 min) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec, r in results(recs, "step"):
        v = r["views_per_s"]
        method = label(r)
        rows.append(
            f"| `{rec['file']}` | {method} | {r['backbone']} | {r['batch']} | {r['image_size']} | "
            f"{r.get('torch_threads', '?')} | {fmt(v['ssl_sphere'], 2)} | {fmt(v['backbone_only'], 2)} | "
            f"{r['ratio']:.3f} | {fmt(v.get('backbone_plus_ema_fwd'), 2)} | "
            f"{fmt(r.get('ratio_vs_ema_floor'), 3)} | {fmt(v.get('lightly'), 2)} | "
            f"{fmt(r.get('speedup_vs_lightly'), 2) + 'x' if r.get('speedup_vs_lightly') else '–'} | {load_str(rec)} |")
    return "\n".join(rows)


def phases_table(recs) -> str:
    rows = []
    for rec, r in results(recs, "step"):
        ph = r.get("phases_s")
        if not ph:
            continue
        total = sum(ph.values())
        rows.append(f"| `{rec['file']}` | {label(r)} | {r.get('torch_threads', '?')} | "
                    + " | ".join(f"{ph.get(k, 0):.3f} ({100 * ph.get(k, 0) / total:.1f}%)"
                                 for k in ("batch_index", "augment", "forward", "backward", "optimizer", "after_step"))
                    + " |")
    if not rows:
        return ""
    head = ["| file | method | threads | batch index s | augment s | forward s | backward s | optimizer s "
            "| after_step s |",
            "|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + rows)


def machine_lines(recs) -> str:
    seen = []
    for rec in recs:
        m, v = rec["machine"], rec["versions"]
        gpu = f"GPU: {m['gpu']}; " if m.get("gpu") else ""
        line = (f"- {gpu}CPU: {m['cpu']}, {m['cores']} cores; torch {v['torch']}, torchvision {v['torchvision']}, "
                f"kornia {v['kornia']}, lightly {v['lightly']}, Python {v.get('python', '?')}")
        if line not in seen:
            seen.append(line)
    return "\n".join(seen)


def commands(recs) -> str:
    """Each record's command, prefixed by the tuning environment variables it ran with."""
    env = lambda rec: "".join(f"{k}={v} " for k, v in rec.get("env", {}).items())  # noqa: E731
    return "\n".join(f"    {env(rec)}{rec['command']}" for rec in recs)


def render(prefix: str = "cpu_") -> str:
    recs = load(prefix)
    if not recs:
        return f"(no records matching {RESULTS}/{prefix}*.json yet)"
    flag = "" if prefix == "cpu_" else " --prefix " + prefix
    parts = [f"Generated by `python benchmarks/make_table.py{flag} --write` "
             f"from `benchmarks/results/{prefix}*.json`.", "",
             machine_lines(recs), "", "### Augmentation (two SimCLR views of one uint8 batch)", "",
             augment_table(recs), "", "### Training step", "", step_table(recs)]
    ph = phases_table(recs)
    if ph:
        parts += ["", "Phases of the ssl_sphere step (`--profile`, median seconds):", "", ph]
    epoch = RESULTS / f"{prefix}epoch.txt"
    if epoch.is_file() and epoch.read_text().strip():
        parts += ["", f"Wall time of one real CIFAR-10 epoch (`{epoch.name}`, written by `benchmarks/gpu.sh`):", "",
                  *[f"    {line}" for line in epoch.read_text().strip().splitlines()]]
    parts += ["", "Commands (the `command` field of each record):", "", commands(recs)]
    return "\n".join(parts)


def render_multicrop(prefix: str = "cpu_") -> str:
    """The multi-crop augmentation records (``bench.py multicrop --out``, kind multicrop) of ``prefix``."""
    recs = load(prefix, kinds=("multicrop",))
    if not recs:
        return f"(no multicrop records matching {RESULTS}/{prefix}*.json yet)"
    flag = "" if prefix == "cpu_" else " --prefix " + prefix
    return "\n".join([f"Generated by `python benchmarks/make_table.py --multicrop{flag} --write` from the multicrop "
                      f"records `benchmarks/results/{prefix}*.json`.", "", machine_lines(recs), "",
                      multicrop_table(recs), "", "Commands (the `command` field of each record):", "", commands(recs)])


def default_run_table(rec) -> str:
    """The default run at several seeds: kNN top-1 at step 0 and at the end, the gain, the wall time."""
    rows = ["| seed | kNN top-1 at step 0 (%) | at the end (%) | gain (points) | wall s |",
            "| --- | --- | --- | --- | --- |"]
    for r in rec["runs"]:
        rows.append(f"| {r['seed']} | {r['start_knn_top1']:.2f} | {r['knn_top1']:.2f} | {r['gain']:+.2f} | "
                    f"{r['wall_s']:.1f} |")
    m = rec["machine"]
    seeds = ", ".join(str(r["seed"]) for r in rec["runs"])
    return "\n".join(rows + [
        "",
        f"Gain over seeds {seeds}: min {rec['min_gain']:+.2f}, median {rec['median_gain']:+.2f} points. "
        f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}; load average (1 min) "
        f"{load_str(rec)}; recorded {rec['recorded']} by `{rec['command']}` "
        f"(`benchmarks/results/{DEFAULT_RUN}`), each run `{rec['run_command']}`."])


def render_default_run() -> str:
    path = RESULTS / DEFAULT_RUN
    if not path.is_file():
        return f"(no record benchmarks/results/{DEFAULT_RUN} yet: run `python benchmarks/default_run_seeds.py`)"
    return default_run_table(json.loads(path.read_text()))


def write_between(targets, start: str, end: str, text: str) -> int:
    """Replace the block between ``start`` and ``end`` in every target that has both markers; returns
    how many targets were written (the other benchmark scripts share this helper)."""
    written = 0
    for target in targets:
        doc = Path(target).read_text()
        if start not in doc or end not in doc:
            continue
        head, rest = doc.split(start, 1)
        _, tail = rest.split(end, 1)
        Path(target).write_text(f"{head}{start}\n{text}\n{end}{tail}")
        print(f"updated {target}")
        written += 1
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true",
                   help="replace the block between the markers in " + ", ".join(str(t) for t in TARGETS)
                   + " (with --default-run: in " + ", ".join(str(t) for t in DEFAULT_RUN_TARGETS) + ")")
    p.add_argument("--prefix", default="cpu_", help="record file prefix (default cpu_)")
    p.add_argument("--default-run", action="store_true",
                   help=f"render results/{DEFAULT_RUN} (the default run at five seeds) instead")
    p.add_argument("--multicrop", action="store_true",
                   help="render the multi-crop augmentation records (bench.py multicrop) instead, between "
                        "<!-- multicrop-table[-gpu]:start/end -->")
    args = p.parse_args(argv)
    if args.default_run:
        table, (start, end), targets = render_default_run(), DEFAULT_RUN_MARKERS, DEFAULT_RUN_TARGETS
    elif args.multicrop:
        table, (start, end), targets = render_multicrop(args.prefix), multicrop_markers(args.prefix), TARGETS
    else:
        table, (start, end), targets = render(args.prefix), markers(args.prefix), TARGETS
    if not args.write:
        print(table)
        return 0
    if not write_between(targets, start, end, table):
        print(f"markers {start} / {end} found in none of " + ", ".join(str(t) for t in targets), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
