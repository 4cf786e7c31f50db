"""The table and the plot of benchmarks.latency's results (its JSON), apart from the timing.

    python -c "import json; from benchmarks.latency_report import format_table; print(format_table(json.load(open('lat.json'))))"
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from runtime.fileio import atomic_write_bytes


def row_line(r: dict) -> str:
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    return (f"{r['format'][:44]:<44} {r['status'][:60]:<60} {f(r.get('size_mb'), '8.1f'):>8} {f(r.get('mAP'), '6.4f'):>6} "
            f"{f(r.get('ms_per_image'), '9.3f'):>9} {f(r.get('images_per_s'), '9.1f'):>9} {f(r.get('batch'), 'd'):>5} "
            f"{r['precision']:>5} {r['device']:>5}")


def format_table(res: dict) -> str:
    head = (f"{'format':<44} {'status':<60} {'size MB':>8} {'mAP':>6} {'ms/image':>9} {'images/s':>9} {'batch':>5} "
            f"{'prec':>5} {'dev':>5}")
    lines = [head] + [row_line(r) for r in res["rows"]]
    lines.append("")
    lines.append(f"{'format':<44} {'prec':>5} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'images/s':>9}")
    for r in res["rows"]:
        for q in r.get("latency", []):
            lines.append(f"{r['format'][:44]:<44} {r['precision']:>5} {q['batch']:>5} {q['p50_ms']:>9.2f} {q['p90_ms']:>9.2f} "
                         f"{q['p99_ms']:>9.2f} {q['images_per_s']:>9.1f}")
    for r in res["rows"]:
        extra = []
        if "prob_diff_vs_fp32" in r:
            extra.append(f"max|p-p_fp32| {r['prob_diff_vs_fp32']['max']:.2e} mean {r['prob_diff_vs_fp32']['mean']:.2e}")
        if "prob_diff_vs_pytorch_fp32" in r:
            extra.append(f"max|p-p_pytorch| {r['prob_diff_vs_pytorch_fp32']:.2e}")
        if "e2e_images_per_s" in r:
            rounds = ", ".join(f"{x:.3f}" for x in r.get("e2e_over_engine_rounds", []))
            extra.append(f"end-to-end {r['e2e_images_per_s']:.1f} images/s = {r['e2e_over_engine']:.3f}x engine-only "
                         f"at batch {max(q['batch'] for q in r['latency'])} ({r['e2e_threads']} threads shared by "
                         f"decode and inference; median of {r.get('e2e_rounds', 1)} alternating rounds: {rounds})")
        if extra:
            lines.append(f"{r['format']} {r['precision']}: " + "; ".join(extra))
    v = res["versions"]
    lines.append("versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k] is not None and k != "onnxruntime_providers"))
    return "\n".join(lines)


def plot(res: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in res["rows"]:
        lat = r.get("latency")
        if not lat:
            continue
        bs = [q["batch"] for q in lat]
        label = f"{r['format']} {r['precision']} ({r['device']})"
        a.plot(bs, [q["p50_ms"] for q in lat], "o-", label=label)
        b.plot(bs, [q["images_per_s"] for q in lat], "o-", label=label)
    for ax, yl in ((a, "p50 latency per batch (ms)"), (b, "images/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=7)
    fig.suptitle(f"probres latency vs batch ({res['versions'].get('gpu') or res['machine']['cpu']})", fontsize=10)
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(suffix=".png") as tmp:
        fig.savefig(tmp.name, dpi=110)
        atomic_write_bytes(out, Path(tmp.name).read_bytes())
    plt.close(fig)
