"""What ``pmod bench`` prints and draws: the results table, the per-layer profile, the plot."""

from __future__ import annotations

from pmod.errors import PmodError
from pmod.app.bench.profile import SECTIONS


def fmt_bytes(b) -> str:
    if b is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b} B"


def fmt_ms(s: float) -> str:
    ms = 1e3 * s
    return f"{ms:.{0 if ms >= 100 else 1 if ms >= 10 else 2 if ms >= 1 else 3}f}"


def mode_label(mode: str) -> str:
    return "p-MoD" if mode == "pmod" else "dense"


def retention_note(cfg: dict) -> str:
    """``", p-MoD at retention S"`` for a run off the trained schedule, else nothing."""
    return f", p-MoD at retention {cfg['retention']:g}" if cfg["retention"] != 1 else ""


def speedups(doc: dict) -> dict[tuple[str, int], float]:
    """Dense median prefill over p-MoD median prefill, per (backend, vision tokens)."""
    med = {(r["backend"], r["mode"], r["vision_tokens"]): r["prefill_s"]["median"] for r in doc["results"]}
    return {(b, n): med[(b, "dense", n)] / s for (b, m, n), s in med.items() if m == "pmod" and (b, "dense", n) in med}


def format_table(doc: dict) -> str:
    cfg, lines = doc["config"], []
    c = cfg["model_config"]
    what = f"preset {cfg['preset']}" if cfg["preset"] else f"model {cfg['model']}"
    lines.append(f"{what}: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
                 f"{cfg['text_tokens']} text tokens, {cfg['decode_tokens']} decode tokens, "
                 f"median of {cfg['repeat']} after a warm-up, dtype {cfg['dtype'] or 'default'}"
                 + retention_note(cfg))
    peaks = [f"{b} {i['matmul_peak']['gflops']:.1f} GFLOP/s (n={i['matmul_peak']['size']})"
             for b, i in doc["backends"].items() if i.get("matmul_peak")]
    if peaks:
        lines.append("float32 matmul peak: " + ", ".join(peaks))
    up = speedups(doc)
    device = any(r.get("peak_device_bytes") is not None for r in doc["results"])
    head = ["backend", "mode", "vision", "prefill ms", "min-max ms", "speedup", "decode tok/s",
            "KV held", "KV analytic", "peak mem", *(["GPU peak"] if device else []), "GFLOP/s", "% peak"]
    rows = [head]
    for r in doc["results"]:
        peak = (doc["backends"].get(r["backend"]) or {}).get("matmul_peak")
        p = r["prefill_s"]
        s = up.get((r["backend"], r["vision_tokens"])) if r["mode"] == "pmod" else None
        rows.append([r["backend"], mode_label(r["mode"]), str(r["vision_tokens"]), fmt_ms(p["median"]),
                     f"{fmt_ms(p['min'])}-{fmt_ms(p['max'])}", "-" if s is None else f"{s:.2f}x",
                     "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}",
                     fmt_bytes(r["kv_bytes"]), fmt_bytes(r["kv_bytes_analytic"]), fmt_bytes(r["peak_mem_bytes"]),
                     *([fmt_bytes(r.get("peak_device_bytes"))] if device else []), f"{r['gflops']:.2f}", f"{100 * r['gflops'] / peak['gflops']:.1f}%" if peak else "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)


def format_profile(doc: dict) -> str:
    """Per-layer times at the largest vision count, dense next to p-MoD split into sections."""
    out = []
    profiled = [b for b in doc["backends"] if any(p["backend"] == b for p in doc["profile"])]
    for b in doc["backends"]:
        entries = {(p["mode"], p["vision_tokens"]): p for p in doc["profile"]
                   if p["backend"] == b and p.get("kernels") is not False}
        twins = {p["vision_tokens"]: p for p in doc["profile"] if p["backend"] == b and p.get("kernels") is False}
        if not entries:
            only = f"{' and '.join(profiled)} only" if profiled else "its engine times no layers"
            out.append(f"per-layer profile: {b}: not available ({only})")
            continue
        n = max(v for _, v in entries)
        dense, pmod = entries.get(("dense", n)), entries.get(("pmod", n))
        if dense is None or pmod is None:
            continue
        out.append(f"per-layer profile: {b}, {n} vision + {pmod['text_tokens']} text tokens (ms, median of "
                   f"{doc['config']['repeat']}; each boundary waits for the work before it)")
        head = ["layer", "kind", "tokens", "dense", "p-MoD", *SECTIONS]
        rows = [head]
        for d, p in zip(dense["layers"], pmod["layers"]):
            rows.append([str(p["layer"]), "MoD" if p["mod"] else "dense", str(p["tokens"]), fmt_ms(d["total_s"]),
                         fmt_ms(p["total_s"]), *("-" if s == "route" and not p["mod"] else fmt_ms(p[f"{s}_s"])
                                              for s in SECTIONS)])
        total = lambda e, k: sum(x[k] for x in e["layers"])  # noqa: E731
        rows.append(["all", "", "", fmt_ms(total(dense, "total_s")), fmt_ms(total(pmod, "total_s")),
                     *(fmt_ms(total(pmod, f"{s}_s")) for s in SECTIONS)])
        rows.append(["rest", "", "", fmt_ms(dense["rest_s"]), fmt_ms(pmod["rest_s"]), "", "", "", ""])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        out += ["  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                for r in rows]
        routing = sum(x["route_s"] + x["merge_s"] for x in pmod["layers"] if x["mod"])
        with_kernels = " with the Metal kernels" if pmod.get("kernels") else ""
        out.append(f"routing overhead (route + merge of the MoD layers){with_kernels}: {fmt_ms(routing)} ms, "
                   f"{100 * routing / pmod['prefill_s']:.1f}% of the p-MoD prefill")
        if n in twins:
            t = twins[n]
            twin = sum(x["route_s"] + x["merge_s"] for x in t["layers"] if x["mod"])
            out.append(f"  the same with the kernels' MLX twins: {fmt_ms(twin)} ms, "
                       f"{100 * twin / t['prefill_s']:.1f}% of that prefill")
    return "\n".join(out)


def write_plot(doc: dict, path) -> None:
    """Prefill latency vs vision tokens (dense dashed, p-MoD solid) and the speedup, per backend."""
    try:
        from matplotlib.figure import Figure  # Figure.savefig renders PNG with Agg, no pyplot state
    except ImportError:
        raise PmodError("--plot needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    lat, up = fig.subplots(1, 2)
    speed = speedups(doc)
    for i, b in enumerate(doc["backends"]):
        color = f"C{i}"
        for mode, style in (("dense", "--"), ("pmod", "-")):
            pts = sorted((r["vision_tokens"], r["prefill_s"]["median"]) for r in doc["results"]
                         if r["backend"] == b and r["mode"] == mode)
            if pts:
                lat.plot(*zip(*pts), style, marker="o", color=color, label=f"{b} {mode_label(mode)}")
        pts = sorted((n, s) for (bb, n), s in speed.items() if bb == b)
        if pts:
            up.plot(*zip(*pts), "-", marker="o", color=color, label=b)
    lat.set(xlabel="vision tokens", ylabel="prefill latency (s, median)", title="prefill latency", yscale="log")
    up.axhline(1.0, color="grey", linewidth=0.8)
    up.set(xlabel="vision tokens", ylabel="dense / p-MoD prefill time", title="p-MoD speedup")
    for ax in (lat, up):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    cfg = doc["config"]
    fig.suptitle(f"pmod bench: {('preset ' + cfg['preset']) if cfg['preset'] else cfg['model']}, "
                 f"{cfg['text_tokens']} text tokens{retention_note(cfg)}")
    try:
        fig.savefig(path, dpi=120, format="png")
    except OSError as e:
        raise PmodError(f"cannot write --plot {path}: {e.strerror or e}") from None
