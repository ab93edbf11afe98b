"""Accuracy and TFLOPs of a model as the retention dial turns (``--retention S``).

For each S the held-out shapes questions are answered greedily at that dial (the same
``evaluate`` as ``scripts/eval_default_model.py``), and the analytic decoder TFLOPs and
KV-cache entries of the prompt are computed at S (``pmod.flops.report``); the dense twin
on the same weights is the reference. Writes a Markdown table, the figures as JSON, and a
plot of accuracy and TFLOPs against S.

    python scripts/retention_sweep.py [--model DIR] [--values 0.25,0.5,...] [--n 500] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pmod.tasks import shapes
from pmod.errors import PmodError
from pmod.flops import report
from pmod.image import ImageProcessorConfig, preprocess
from pmod.app.models import resolve_model
from pmod.tasks.shapes.evaluate import evaluate
from pmod.schedule import check_retention

DEFAULT_VALUES = "0.25,0.5,0.75,1,1.25,1.5,2"


def parse_values(text: str) -> list[float]:
    try:
        values = [check_retention(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PmodError(f"--values must be comma-separated numbers > 0, got {text!r}") from None
    if not values:
        raise PmodError("--values is empty")
    return sorted(set(values))


def prompt_tokens(model_dir, config, sample, prompt_len: float) -> tuple[int, int]:
    """(routed vision tokens, text tokens) of a question's prompt: the image's routed tokens
    (every test image has the same size) and the rest of the mean prompt length."""
    image = preprocess(sample.image, config, ImageProcessorConfig.for_model(config, model_dir))
    n_vision = int(image.routed_mask(config.mod_target_token_type).sum())
    return n_vision, max(0, round(prompt_len) - image.num_tokens)


def accuracy(result: dict) -> float:
    return sum(result["right"].values()) / max(1, sum(result["total"].values()))


def sweep(model_dir, values, samples, backend="mlx", dtype=None, dense=True) -> dict:
    rows = []
    for s in values:
        r = evaluate(model_dir, samples, dense=False, backend=backend, dtype=dtype, retention=s)
        config = r.pop("config")
        n_vision, n_text = prompt_tokens(model_dir, config, samples[0], r["prompt_tokens"])
        rep = report(config, n_vision, n_text, retention=s)
        rows.append({"retention": s, "accuracy": accuracy(r), **r, "flops": rep.to_dict()})
    out = {"model": str(model_dir), "n": len(samples), "rows": rows}
    if dense:
        r = evaluate(model_dir, samples, dense=True, backend=backend, dtype=dtype)
        r.pop("config")
        out["dense"] = {"accuracy": accuracy(r), **r, "tflops": rows[0]["flops"]["dense_tflops"]}
    return out


def table(result: dict) -> str:
    lines = ["| retention | accuracy | TFLOPs | TFLOPs vs dense | KV entries vs dense | time |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        f = r["flops"]
        lines.append(f"| {r['retention']:g} | {100 * r['accuracy']:.1f}% | {f['pmod_tflops']:.4f} | "
                     f"{100 * f['flops_ratio']:.1f}% | {100 * f['kv_ratio']:.1f}% | {r['seconds']:.0f} s |")
    if "dense" in result:
        d = result["dense"]
        lines.append(f"| dense | {100 * d['accuracy']:.1f}% | {d['tflops']:.4f} | 100.0% | 100.0% | "
                     f"{d['seconds']:.0f} s |")
    f = result["rows"][0]["flops"]
    lines.append(f"\n{result['n']} questions; prompt: {f['n_vision']} routed vision + {f['n_text']} text tokens; "
                 "TFLOPs: decoder prefill (pmod flops)")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    try:
        from matplotlib.figure import Figure  # renders PNG with Agg, no pyplot state
    except ImportError:
        raise PmodError("the plot needs matplotlib: pip install matplotlib (or pass --no-plot)") from None
    x = [r["retention"] for r in result["rows"]]
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(x, [100 * r["accuracy"] for r in result["rows"]], "o-", color="tab:blue", label="p-MoD accuracy")
    ax.set_xlabel("retention dial S (MoD ratios x S, clamped to [min, 1])")
    ax.set_ylabel("accuracy (%)", color="tab:blue")
    tf = ax.twinx()
    tf.plot(x, [r["flops"]["pmod_tflops"] for r in result["rows"]], "s--", color="tab:red", label="p-MoD TFLOPs")
    tf.set_ylabel("decoder prefill TFLOPs", color="tab:red")
    if "dense" in result:
        ax.axhline(100 * result["dense"]["accuracy"], color="tab:blue", lw=0.8, ls=":", label="dense accuracy")
        tf.axhline(result["dense"]["tflops"], color="tab:red", lw=0.8, ls=":", label="dense TFLOPs")
    handles = ax.get_legend_handles_labels()[0] + tf.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower right", fontsize="small")
    ax.set_title(f"{Path(result['model']).name}: accuracy and TFLOPs vs retention ({result['n']} questions)",
                 fontsize="medium")
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="pmod checkpoint directory (default: the embedded model)")
    p.add_argument("--values", default=DEFAULT_VALUES, help=f"retention settings (default {DEFAULT_VALUES})")
    p.add_argument("--n", type=int, default=500, help="test questions (one per image)")
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="mlx", help="mlx or torch (the dial is a build option of onnx/trt)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--no-dense", action="store_true", help="skip the dense reference")
    p.add_argument("--no-plot", action="store_true", help="write the table and JSON only")
    p.add_argument("--out", default="retention-sweep", help="output directory (default %(default)s)")
    args = p.parse_args(argv)
    try:
        values = parse_values(args.values)
        model_dir = resolve_model(args.model)
        samples = shapes.make_samples(args.split, args.n, seed=args.seed, questions_per_image=1)
        result = sweep(model_dir, values, samples, args.backend, args.dtype, dense=not args.no_dense)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        text = table(result)
        (out / "retention_sweep.md").write_text(text + "\n")
        (out / "retention_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        if not args.no_plot:
            plot(result, out / "retention_sweep.png")
    except PmodError as e:
        print(f"retention_sweep: error: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"\nwrote {out}/retention_sweep.md, .json" + ("" if args.no_plot else ", .png"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
