"""Teach the embedded model something new with LoRA, and show it learned it without forgetting.

The embedded model was trained on the shapes task's six colours. This script builds a
finetuning set with ``pmod.tasks.shapes`` in the LLaVA conversation format (JSONL + PNGs) for a
task it cannot do:

- ``colours`` (default): three new colour names (pink, cyan, brown: ``shapes.EXTRA_COLOURS``),
  in scenes of the new colours only and scenes mixed with the old ones, every question type;
- ``relation``: the new question type "is the X left or right of the Y?" (``EXTRA_QUESTION_TYPES``);

plus a share of rows of the original task (replay). It then runs ``pmod lora`` with its
default settings and evaluates before and after, by greedy generation through the same
``Session`` as ``pmod generate`` (``scripts/eval_default_model.py``): held-out questions of
the new task, and the original test set.

    python scripts/lora_shapes.py [--model DIR] [--task colours] [--work DIR] [-- extra pmod lora flags]
    python scripts/lora_shapes.py --work DIR --data-only     # just the JSONL + PNGs
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pmod.tasks import shapes
from pmod.app.models import resolve_model
from pmod.tasks.shapes.evaluate import evaluate

NEW_COLOURS = ("pink", "cyan", "brown")


def task_subsets(task: str) -> dict:
    """Keyword subsets of ``shapes.iter_samples``: the finetuning rows, the new task's held-out
    questions, and a broader held-out check of it."""
    if task == "colours":
        mixed = dict(colours=list(shapes.COLOURS) + list(NEW_COLOURS))
        only_new = dict(colours=list(NEW_COLOURS))
        return {"train": [(0.6, only_new), (0.4, mixed)],
                "eval": [("new colours: colour questions", "colour", only_new),
                         ("new + old colours: all question types", None, mixed)]}
    if task == "relation":
        types = tuple(shapes.QUESTION_TYPES) + tuple(shapes.EXTRA_QUESTION_TYPES)
        return {"train": [(1.0, dict(types=types))],
                "eval": [("relation questions", "relation", dict(min_objects=2))]}
    raise SystemExit(f"lora_shapes: unknown task {task!r}")


def held_out(n: int, seed: int, qtype: str | None, **subset) -> list:
    """``n`` test samples, one question each; with ``qtype`` only scenes that have a question of
    that type (asked with the other types offered too, so no scene is rejected by the sampler)."""
    if qtype is None:
        return shapes.make_samples("lora-test", n, seed=seed, questions_per_image=1, **subset)
    types = tuple(dict.fromkeys((qtype,) + tuple(shapes.QUESTION_TYPES)))
    out = []
    for s in shapes.iter_samples("lora-test", seed=seed, questions_per_image=len(types), types=types, **subset):
        qa = [q for q in s.qa if q[0] == qtype]
        if qa:
            out.append(shapes.Sample(s.image, qa[:1], s.scene))
        if len(out) == n:
            return out


def conversation(qa) -> list:
    conv = []
    for j, (_, q, a) in enumerate(qa):
        conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q}, {"from": "gpt", "value": a}]
    return conv


def write_split(directory: Path, name: str, split: str, n: int, seed: int, qpi: int, replay: float,
                mix: list) -> int:
    """``name``: ``n`` rows, a ``replay`` share from the original task, the rest from ``mix``
    (``[(share, iter_samples subset), ...]``)."""
    img_dir = directory / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    n_replay = int(round(n * replay))
    total = sum(share for share, _ in mix)
    counts = [int(round((n - n_replay) * share / total)) for share, _ in mix]
    parts = [itertools.islice(shapes.iter_samples(f"lora-{split}-{k}", seed=seed, questions_per_image=qpi, **sub), c)
             for k, (c, (_, sub)) in enumerate(zip(counts, mix))]
    parts.append(itertools.islice(shapes.iter_samples(f"lora-{split}-replay", seed=seed, questions_per_image=qpi),
                                  n_replay))
    rows = []
    for i, s in enumerate(itertools.chain(*parts)):
        rel = f"images/{split}-{i:05d}.png"
        s.image.save(directory / rel)
        rows.append(json.dumps({"id": f"{split}-{i}", "image": rel, "conversations": conversation(s.qa)}))
    (directory / name).write_text("\n".join(rows) + "\n")
    return len(rows)


def accuracy(result: dict) -> float:
    return 100.0 * sum(result["right"].values()) / max(1, sum(result["total"].values()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="base pmod checkpoint (default: the embedded model)")
    p.add_argument("--task", choices=["colours", "relation"], default="colours")
    p.add_argument("--work", help="directory for the data and the adapter (default: a temporary one, removed)")
    p.add_argument("--train-images", type=int, default=3000)
    p.add_argument("--valid-images", type=int, default=200)
    p.add_argument("--questions-per-image", type=int, default=4)
    p.add_argument("--replay", type=float, default=0.4, help="share of training rows from the original task")
    p.add_argument("--eval-n", type=int, default=300, help="held-out questions per new-task set")
    p.add_argument("--orig-n", type=int, default=500, help="questions of the original test set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-before", action="store_true", help="do not evaluate the base model")
    p.add_argument("--data-only", action="store_true", help="write the data set (needs --work) and stop")
    p.add_argument("--json", help="write the numbers here")
    args, lora_flags = p.parse_known_args(argv)
    if lora_flags[:1] == ["--"]:
        lora_flags = lora_flags[1:]
    model = resolve_model(args.model)
    if args.data_only and not args.work:
        p.error("--data-only needs --work")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pmod-lora-shapes-"))
    data, adapter = work / "data", work / "adapter"
    if adapter.exists() and "--resume" not in lora_flags:
        print(f"lora_shapes: {adapter} exists; remove it or pass -- --resume", file=sys.stderr)
        return 2
    sub = task_subsets(args.task)

    t0 = time.perf_counter()
    n_train = write_split(data, "train.jsonl", "train", args.train_images, args.seed, args.questions_per_image,
                          args.replay, sub["train"])
    n_valid = write_split(data, "valid.jsonl", "valid", args.valid_images, args.seed, args.questions_per_image,
                          args.replay, sub["train"])
    t_data = time.perf_counter() - t0
    print(f"data: {n_train} training + {n_valid} validation rows in {data} ({t_data:.0f} s)", file=sys.stderr)
    if args.data_only:
        return 0

    sets = [(name, held_out(args.eval_n, args.seed, qtype, **kw)) for name, qtype, kw in sub["eval"]]
    sets.append(("original test set (all types)", shapes.make_samples("test", args.orig_n, seed=0,
                                                                       questions_per_image=1)))
    before = {}
    t0 = time.perf_counter()
    if not args.skip_before:
        for name, samples in sets:
            before[name] = evaluate(model, samples, dense=False, dtype="float32")
    t_eval_before = time.perf_counter() - t0

    import pmod_mlx  # noqa: F401  (its fast BLAS must load before mlx.core)
    import mlx.core as mx

    from pmod.app.cli import main as pmod_main

    mx.reset_peak_memory()
    cmd = ["lora", "--model", str(model), "--data", str(data), "--adapter-path", str(adapter)] + lora_flags
    print("running: pmod " + " ".join(cmd), file=sys.stderr)
    t0 = time.perf_counter()
    if pmod_main(cmd) != 0:
        return 2
    t_train = time.perf_counter() - t0
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    result = cfg.get("result", {})

    after = {}
    t0 = time.perf_counter()
    for name, samples in sets:
        after[name] = evaluate(model, samples, dense=False, dtype="float32", adapter_path=adapter)
    t_eval_after = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)

    print(f"\nLoRA on {model} ({args.task}): rank {cfg['rank']}, alpha {cfg['alpha']:g}, "
          f"{','.join(cfg['target_modules'])}" + (" + routers" if cfg["train_routers"] else "")
          + (" + projector" if cfg["train_projector"] else "") + f", {cfg['training']['iters']} steps of "
          f"{cfg['training']['batch_size']}, learning rate {cfg['training']['learning_rate']:g}\n")
    print("| held-out set | n | before | after |")
    print("|---|---|---|---|")
    for name, samples in sets:
        b = f"{accuracy(before[name]):.1f}%" if name in before else "-"
        print(f"| {name} | {len(samples)} | {b} | {accuracy(after[name]):.1f}% |")
    print(f"\ntime: data {t_data:.0f} s, LoRA training {t_train / 60:.1f} min "
          f"({result.get('steps')} steps, {result.get('steps', 0) / max(result.get('seconds', 1), 1e-9):.2f} it/s, "
          f"{result.get('tokens', 0) / max(result.get('seconds', 1), 1e-9):.0f} tok/s), evaluation "
          f"{t_eval_before:.0f} s before + {t_eval_after:.0f} s after")
    print(f"peak memory: training {result.get('peak_memory_gb', float('nan')):.2f} GB (MLX), "
          f"process max RSS {rss:.2f} GB")
    print(f"final validation: loss {result.get('val_loss') or float('nan'):.3f}, "
          f"rows with every reply right (teacher-forced; a multi-turn row needs all its replies) "
          f"{100 * (result.get('val_accuracy') or 0):.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "task": args.task, "model": str(model), "adapter": str(adapter), "lora": cfg,
            "before": {k: {"accuracy": accuracy(v), **{x: v[x] for x in ("right", "total")}} for k, v in before.items()},
            "after": {k: {"accuracy": accuracy(v), **{x: v[x] for x in ("right", "total")}} for k, v in after.items()},
            "seconds": {"data": t_data, "train": t_train, "eval_before": t_eval_before, "eval_after": t_eval_after},
            "peak_memory_gb": result.get("peak_memory_gb"), "max_rss_gb": rss}, indent=2, default=str))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
