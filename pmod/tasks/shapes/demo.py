"""``pmod demo``: the embedded model answering questions about a drawn image, and what p-MoD saved.

It draws a sample of the synthetic shapes task (or takes ``--image``/``--prompt``),
streams the answers, prints per layer the vision tokens kept and the TFLOPs and KV
entries of dense vs p-MoD for that prompt, and writes a PNG that shows, for a few
layers, which image patches the routers kept (like Fig. 5 of the paper).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pmod.errors import PmodError
from pmod.flops import report
from pmod.app.generate import Sampler, SamplerArgs
from pmod.schedule import layer_ratios

PANEL = 192  # pixels per panel side in the picture


def _kept_patches(kept_positions, image_positions: np.ndarray, image, P: int) -> np.ndarray:
    """Per layer, a [P, P] bool map of the base tile's patches the layer kept."""
    index = image.feature_index()
    base = index < P * P  # tokens of the first (base) tile
    maps = []
    for held in kept_positions:
        keep = np.isin(image_positions, held)
        m = np.zeros(P * P, dtype=bool)
        m[index[base & keep]] = True
        maps.append(m.reshape(P, P))
    return maps


def routing_picture(pil_image, maps: list[np.ndarray], layers: list[int], ratios) -> Image.Image:
    """The image, then one panel per layer with the skipped patches greyed out."""
    img = pil_image.convert("RGB").resize((PANEL, PANEL), Image.BICUBIC)
    panels = [("input", img)]
    for layer in layers:
        m = maps[layer]
        P = m.shape[0]
        mask = Image.fromarray((~m).astype(np.uint8) * 255).resize((PANEL, PANEL), Image.NEAREST)
        grey = Image.blend(img, Image.new("RGB", img.size, (235, 235, 235)), 0.85)
        panel = Image.composite(grey, img, mask)
        d = ImageDraw.Draw(panel)
        step = PANEL / P
        for i in range(1, P):
            d.line([(0, i * step), (PANEL, i * step)], fill=(210, 210, 210))
            d.line([(i * step, 0), (i * step, PANEL)], fill=(210, 210, 210))
        r = ratios[layer]
        title = f"layer {layer}: {int(m.sum())}/{P * P} kept" + ("" if r is None else f" (r={r:.2f})")
        panels.append((title, panel))
    pad, head = 8, 18
    out = Image.new("RGB", (len(panels) * (PANEL + pad) + pad, PANEL + head + 2 * pad), "white")
    d = ImageDraw.Draw(out)
    for i, (title, panel) in enumerate(panels):
        x = pad + i * (PANEL + pad)
        d.text((x, pad // 2), title, fill="black")
        out.paste(panel, (x, pad + head))
    return out


def run_demo(args, out=None, err=None) -> Path:
    from pmod.tasks import shapes
    from pmod.image import preprocess
    from pmod.app.session import Reply, session_from_args

    out, err = out or sys.stdout, err or sys.stderr
    model_dir = args.model
    if (args.image is None) != (args.prompt is None) and args.image is None:
        raise PmodError("--prompt needs --image (or give neither for a drawn sample)")
    session = session_from_args(args)
    config = session.config
    if config.vision_config is None:
        raise PmodError(f"{model_dir} has no vision tower; the demo needs a multimodal model")
    if args.image is not None:
        from pmod.image import load_image

        pil = load_image(args.image)
        questions = [(args.prompt or "what is in the image?", None)]
        print(f"image: {args.image}", file=out)
    else:
        sample = shapes.make_samples("demo", 1, seed=args.sample, questions_per_image=args.questions)[0]
        pil = sample.image
        questions = [(q, a) for _, q, a in sample.qa]
        print(f"image: drawn sample {args.sample}: {sample.scene.describe()}", file=out)
    sampler = Sampler(SamplerArgs(temp=0.0))
    first = None
    for q, expected in questions:
        session.reset()
        reply = Reply()
        print(f"Q: {q}\nA: ", end="", file=out, flush=True)
        for piece in session.ask(q, images=[pil], max_tokens=args.max_tokens, sampler=sampler, reply=reply):
            print(piece, end="", file=out, flush=True)
        mark = "" if expected is None else ("   (right)" if reply.text.strip() == expected else
                                            f"   (expected: {expected})")
        print(mark, file=out)
        if first is None:
            first = (session.engine.kept_positions(), session.image_positions[0], reply.stats.prompt_tokens)
    kept, image_positions, n_prompt = first
    n_vision = len(image_positions)
    n_text = n_prompt - n_vision
    retention = session.engine.retention
    rep = report(config, n_vision, n_text, retention=retention)
    ratios = layer_ratios(config, retention)
    held_vision = [int(np.isin(image_positions, h).sum()) for h in kept]
    at = "" if retention == 1.0 else f" at retention {retention:g}"
    print(f"\np-MoD{at} on the first question's prompt: {n_vision} vision + {n_text} text tokens", file=out)
    print(f"{'layer':>5}  {'ratio':>7}  {'kept vision':>11}  {'KV p-MoD':>8}  {'KV dense':>8}", file=out)
    for i, (r, kv_p, kv_d) in enumerate(zip(ratios, rep.pmod_kv_entries, rep.dense_kv_entries)):
        print(f"{i:>5}  {'dense' if r is None else f'{r:.3f}':>7}  {held_vision[i]:>5} / {n_vision:<4}  "
              f"{kv_p:>8}  {kv_d:>8}", file=out)
    print(f"TFLOPs (decoder prefill): dense {rep.dense['total'] / 1e12:.5f}, p-MoD "
          f"{rep.pmod['total'] / 1e12:.5f} ({100 * rep.flops_ratio:.1f}%)", file=out)
    print(f"KV-cache entries: dense {sum(rep.dense_kv_entries)}, p-MoD {sum(rep.pmod_kv_entries)} "
          f"({100 * rep.kv_ratio:.1f}%)", file=out)

    image_input = preprocess(pil, config, session.processor)
    P = int(np.sqrt(image_input.tokens_per_tile))
    maps = _kept_patches(kept, image_positions, image_input, P)
    routed = [i for i, r in enumerate(ratios) if r is not None]
    show = sorted({routed[0], routed[len(routed) // 2], routed[-1]}) if routed else []
    picture = routing_picture(pil, maps, show, ratios)
    out_dir = Path(args.out or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "pmod-demo-routing.png"
    tmp = path.with_suffix(".png.tmp")
    picture.save(tmp, format="PNG")
    tmp.replace(path)
    print(f"\nwrote {path} (kept image patches in layers {', '.join(map(str, show))})", file=out)
    return path
