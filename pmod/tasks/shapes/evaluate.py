"""Accuracy of a model on the shapes task's held-out test questions, p-MoD vs dense.

Each test image gets one question; the answer is generated greedily through the same
``Session`` that ``pmod generate`` uses and must match exactly. The same weights then run
with every layer dense (all vision tokens kept, routers unused). The table also gives the
analytic TFLOPs and KV-cache entries of the p-MoD prompt against dense, and a second one
the p-MoD accuracy per type by the number of objects in the image, with how many wrong
colour, shape and position answers are true of an object the question did not name.

``evaluate`` is the one accuracy measure the scripts share (``quantize_eval``,
``retention_sweep``, ``lora_shapes``); ``scripts/eval_default_model.py`` runs ``main``.

    python scripts/eval_default_model.py [--model DIR] [--n 500] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import numpy as np
from tqdm import tqdm

from pmod.tasks import shapes
from pmod.flops import report
from pmod.app.generate import Sampler, SamplerArgs
from pmod.app.models import resolve_model
from pmod.app.session import Reply, open_session


def other_objects_answers(scene: shapes.Scene, question: str) -> set:
    """What a colour, shape or position question would answer about the objects it does not
    name: a wrong answer in this set means the model looked at the wrong object."""
    named = shapes.referent(scene, question)
    W = scene.size
    out = set()
    for i, o in enumerate(scene.objects):
        if i != named:
            out |= {o.colour, o.shape, "left" if o.cx < W / 2 else "right", "top" if o.cy < W / 2 else "bottom"}
    return out


def evaluate(model_dir, samples, dense: bool, backend: str = "mlx", dtype=None, adapter_path=None,
             retention: float | None = None) -> dict:
    """Exact-match accuracy per question type; ``retention`` sets the dial (None: as trained)."""
    kwargs = {"dense": True} if dense else {}
    if adapter_path:
        kwargs["adapter_path"] = adapter_path
    session = open_session(model_dir, backend=backend, dtype=dtype, retention=retention, **kwargs)
    sampler = Sampler(SamplerArgs(temp=0.0))
    right, total = defaultdict(int), defaultdict(int)
    by_objects = defaultdict(lambda: [0, 0])  # "type n_objects" -> [right, total]
    elsewhere = defaultdict(lambda: [0, 0])  # type -> [wrong answers true of another object, wrong answers]
    prompt_tokens = []
    t0 = time.perf_counter()
    desc = "dense" if dense else "p-MoD" if retention is None else f"p-MoD @{retention:g}"
    for s in tqdm(samples, desc=desc, unit="q", file=sys.stderr):
        qtype, q, a = s.qa[0]
        session.reset()
        reply = Reply()
        for _ in session.ask(q, images=[s.image], max_tokens=8, sampler=sampler, reply=reply):
            pass
        answer = reply.text.strip()
        total[qtype] += 1
        right[qtype] += answer == a
        cell = by_objects[f"{qtype} {len(s.scene.objects)}"]
        cell[0] += answer == a
        cell[1] += 1
        if answer != a and qtype in ("colour", "shape", "position"):
            elsewhere[qtype][0] += answer in other_objects_answers(s.scene, q)
            elsewhere[qtype][1] += 1
        prompt_tokens.append(reply.stats.prompt_tokens)
    return {"right": dict(right), "total": dict(total), "by_objects": dict(by_objects), "elsewhere": dict(elsewhere),
            "seconds": time.perf_counter() - t0,
            "prompt_tokens": float(np.mean(prompt_tokens)), "config": session.config}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="pmod checkpoint directory (default: the embedded model)")
    p.add_argument("--adapter-path", help="a LoRA adapter directory to apply")
    p.add_argument("--n", type=int, default=500, help="test questions (one per image)")
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="mlx")
    p.add_argument("--dtype", default=None)
    p.add_argument("--no-dense", action="store_true", help="skip the dense comparison")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    model_dir = resolve_model(args.model)
    samples = shapes.make_samples(args.split, args.n, seed=args.seed, questions_per_image=1)
    modes = [("p-MoD", False)] + ([] if args.no_dense else [("dense", True)])
    results = {name: evaluate(model_dir, samples, dense, args.backend, args.dtype, args.adapter_path)
               for name, dense in modes}
    config = results["p-MoD"].pop("config")
    for r in results.values():
        r.pop("config", None)
    n_vision = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    n_text = round(results["p-MoD"]["prompt_tokens"]) - n_vision
    rep = report(config, n_vision, n_text)

    types = sorted(results["p-MoD"]["total"])
    head = "| question type | n | " + " | ".join(f"{name} accuracy" for name, _ in modes) + " |"
    print(head)
    print("|" + "---|" * (2 + len(modes)))
    for t in types + ["all"]:
        n = sum(results["p-MoD"]["total"].values()) if t == "all" else results["p-MoD"]["total"][t]
        cells = []
        for name, _ in modes:
            r = results[name]
            right = sum(r["right"].values()) if t == "all" else r["right"].get(t, 0)
            cells.append(f"{100 * right / n:.1f}%")
        label = "**all**" if t == "all" else t
        print(f"| {label} | {n} | " + " | ".join(cells) + " |")
    mod = results["p-MoD"]
    counts = sorted({int(k.split()[1]) for k in mod["by_objects"]})
    print("\n| p-MoD by objects in the image | " + " | ".join(str(n) for n in counts)
          + " | wrong answers true of another object |")
    print("|" + "---|" * (2 + len(counts)))
    for t in types:
        cells = [f"{100 * c[0] / c[1]:.0f}% of {c[1]}" if (c := mod["by_objects"].get(f"{t} {n}")) else "-"
                 for n in counts]
        e = mod["elsewhere"].get(t)
        print(f"| {t} | " + " | ".join(cells) + f" | {f'{e[0]} of {e[1]}' if e else '-'} |")
    print(f"\nprompt: {n_vision} vision + {n_text} text tokens; p-MoD / dense: "
          f"TFLOPs {100 * rep.flops_ratio:.1f}%, KV-cache entries {100 * rep.kv_ratio:.1f}%")
    print("time: " + ", ".join(f"{name} {results[name]['seconds']:.0f} s" for name, _ in modes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "flops": rep.to_dict(), "n": args.n, "split": args.split}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
