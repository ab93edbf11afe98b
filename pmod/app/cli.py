"""The ``pmod`` command. Runtimes are imported only inside the subcommands that need them.

Every error is one line, ``pmod: error: <message>``, with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from pmod.errors import BadSetting, PmodError
from pmod.static.contract import DEFAULT_TARGET, TARGETS


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors follow the same one-line rule
        raise PmodError(f"{message} (see '{self.prog} --help')")


def _cmd_info(args) -> None:
    from pmod.app.info import print_info

    print_info(args.model, system=args.system)


def _cmd_convert(args) -> None:
    from pmod.app.registry import tool
    from pmod.convert import convert_checkpoint

    what = "pmod convert --quantize" if args.quantize is not None else "pmod convert --dequantize"
    ops = tool("quantization", what) if args.quantize is not None or args.dequantize else None
    dst = convert_checkpoint(args.src, args.dst, dtype=args.dtype, vision_tower=args.vision_tower,
                             quantize=args.quantize, group_size=args.group_size, dequantize=args.dequantize,
                             quant_ops=ops)
    print(f"wrote {dst}", file=sys.stderr)


def _cmd_flops(args) -> None:
    """``pmod flops``: the config from ``--model`` or ``--preset``, then the report."""
    from pmod.flops import PRESETS, format_report, preset_config, report
    from pmod.format import read_config

    if args.model is None and args.preset is None:
        raise PmodError(f"give a model directory or --preset NAME (presets: {', '.join(sorted(PRESETS))})")
    if args.model is not None and args.preset is not None:
        raise PmodError("give either a model directory or --preset, not both")
    for flag, n in (("--vision-tokens", args.vision_tokens), ("--text-tokens", args.text_tokens)):
        if n < 0:
            raise PmodError(f"{flag} must be >= 0, got {n}")
    if args.preset is not None:
        config, title = preset_config(args.preset), f"preset {args.preset}"
    else:
        config, title = read_config(args.model), f"model {args.model}"
    rep = report(config, args.vision_tokens, args.text_tokens, args.kv_dtype,
                 retention=1.0 if args.retention is None else args.retention)
    if not config.is_mod:
        title += " (dense model: mod_target_layers is null)"
    sys.stdout.write(format_report(rep, title) + "\n")


def _cmd_generate(args) -> None:
    from pmod.app.generate import Sampler, SamplerArgs, print_stats
    from pmod.app.session import Reply, session_from_args

    if args.max_tokens < 1:
        raise PmodError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    sampler = Sampler(SamplerArgs(args.temp, args.top_p, args.seed))
    session = session_from_args(args)
    reply = Reply()
    for piece in session.ask(args.prompt, images=args.image or [], max_tokens=args.max_tokens,
                             sampler=sampler, reply=reply):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose:
        print_stats(reply.stats)


def _cmd_demo(args) -> None:
    from pmod.tasks.shapes.demo import run_demo

    run_demo(args)


def _cmd_chat(args) -> None:
    from pmod.app.chat import run_chat

    run_chat(args)


def _cmd_server(args) -> None:
    from pmod.app.serve import run_server

    run_server(args)


def _cmd_lora(args) -> None:
    from pmod.app.models import resolve_model
    from pmod.app.registry import tool

    if args.model is None and not args.resume:
        args.model = str(resolve_model(None))
    tool("lora", "pmod lora")(args)


def _cmd_fuse(args) -> None:
    from pmod.app.models import resolve_model
    from pmod.app.registry import tool
    from pmod.format import read_config
    from pmod.fuse import fuse

    model = resolve_model(args.model)
    quantized = read_config(model).quant is not None
    ops = tool("quantization", "pmod fuse on a quantized checkpoint") if quantized else None
    dst = fuse(model, args.adapter_path, args.out, dtype=args.dtype, ops=ops)
    print(f"wrote {dst}", file=sys.stderr)


def _cmd_bench(args) -> None:
    from pmod.app.bench import run_bench_command

    run_bench_command(args)


def _cmd_export_onnx(args) -> None:
    from pmod.app.models import resolve_model
    from pmod.app.registry import tool

    buckets = args.buckets
    if buckets is not None and buckets != "geometric":
        buckets = [b.strip() for b in buckets.split(",")]
        if not all(b.isdigit() for b in buckets):
            raise PmodError(f"--buckets takes increasing whole numbers separated by commas (e.g. 576,1152,2880) "
                            f"or 'geometric', got {args.buckets!r}")
    dst = tool("export_onnx", "pmod export onnx")(
        resolve_model(args.model), args.out, args.max_vision_tokens, dtype=args.dtype, max_context=args.max_context,
        retention=1.0 if args.retention is None else args.retention, target=args.target, buckets=buckets)
    print(f"wrote {dst}", file=sys.stderr)


def _cmd_export_lint(args) -> None:
    from pmod.static.lint import lint_path

    try:
        findings = lint_path(args.path)
    except ImportError as e:
        raise PmodError(f"pmod export lint needs onnx ({e.name or e} is missing): pip install onnx") from None
    for f in findings:
        print(f)
    if findings:
        raise PmodError(f"{len(findings)} TensorRT-compatibility problem(s) in {args.path} (listed above)")
    print(f"{args.path}: no TensorRT-compatibility problems", file=sys.stderr)


def _cmd_export_triton(args) -> None:
    from pmod.app.models import resolve_model
    from pmod.app.triton import export_triton

    dst = export_triton(resolve_model(args.model), args.backend, args.out, name=args.name, instances=args.instances,
                        max_queue=args.max_queue, device=args.device, dtype=args.dtype, copy=args.copy)
    print(f"wrote {dst}", file=sys.stderr)


def _cmd_trt_build(args) -> None:
    from pmod.app.registry import tool

    dst = tool("build_trt", "pmod trt build")(args.onnx, args.out, precision=args.precision, workspace_gb=args.workspace,
                        timing_cache=args.timing_cache, progress=not args.no_progress)
    print(f"wrote {dst}", file=sys.stderr)


def _add_sampling(s) -> None:
    from pmod.app.registry import BACKENDS

    s.add_argument("--backend", default="mlx", choices=list(BACKENDS),
                   help="runtime: mlx or torch (--model is a pmod checkpoint), onnx (--model is a "
                        "'pmod export onnx' directory)")
    s.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="compute dtype (default: float32 on CPU, float16 on Metal)")
    s.add_argument("--device", default=None,
                   help="torch backend: cpu (default) or cuda[:N] for the weights and KV caches")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temp", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--adapter-path", default=None,
                   help="a LoRA adapter directory written by 'pmod lora' (mlx backend; see 'pmod fuse' for others)")
    s.add_argument("--chat-template", action="store_true",
                   help="use the checkpoint's own chat template instead of Vicuna v1 (the released models' template)")
    _add_retention(s, "; an ONNX export runs at the S it was exported with")


def _retention(text: str) -> float:
    """argparse type of ``--retention``: a number > 0, else argparse's one-line error."""
    from pmod.schedule import check_retention

    try:
        return check_retention(float(text))
    except (ValueError, PmodError):
        raise argparse.ArgumentTypeError(f"must be a number > 0 (1 keeps the trained schedule), got {text!r}") from None


def _add_retention(s, what: str = "") -> None:
    s.add_argument("--retention", type=_retention, default=None, metavar="S",
                   help="scale every MoD layer's vision-token ratio by S, clamped to [min ratio, 1]: below 1 is "
                        "faster and less accurate, above 1 keeps more tokens; dense layers stay dense "
                        f"(default 1: as trained{what})")


def _add_lora(s) -> None:
    from pmod.lora_data import TrainArgs

    d = TrainArgs()
    s.add_argument("--model", help="base pmod checkpoint directory (default: the embedded model)")
    s.add_argument("--data", help="a .jsonl file in the LLaVA conversation format (a seeded 10%% is held out "
                                  "for validation), or a directory with train.jsonl and optional valid.jsonl")
    s.add_argument("--adapter-path", required=True, help="output directory for the adapter (and --resume)")
    s.add_argument("--resume", action="store_true",
                   help="continue the run saved in --adapter-path from its last save (same settings)")
    s.add_argument("--iters", type=int, help=f"training steps (default {d.iters})")
    s.add_argument("--batch-size", type=int, help=f"rows per step (default {d.batch_size})")
    s.add_argument("--learning-rate", type=float,
                   help=f"peak Adam learning rate after {d.warmup} warm-up steps, cosine decay to 10%% "
                        f"(default {d.learning_rate})")
    s.add_argument("--warmup", type=int, help=f"warm-up steps (default {d.warmup})")
    s.add_argument("--rank", type=int, help=f"LoRA rank (default {d.rank})")
    s.add_argument("--alpha", type=float, help=f"LoRA alpha; the update is scaled by alpha / rank (default {d.alpha:g})")
    s.add_argument("--dropout", type=float, help=f"dropout on the LoRA input (default {d.dropout:g})")
    s.add_argument("--target-modules", help=f"decoder linears to adapt (default {d.target_modules})")
    s.add_argument("--num-layers", type=int, help="adapt the last N decoder layers (default -1: all)")
    s.add_argument("--train-routers", action=argparse.BooleanOptionalAction, default=None,
                   help="train the MoD routers of those layers in full (default: on)")
    s.add_argument("--train-projector", action=argparse.BooleanOptionalAction, default=None,
                   help="train the multimodal projector in full (default: off)")
    s.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute layer activations in the backward pass (less memory, slower)")
    s.add_argument("--val-batches", type=int,
                   help=f"validation batches per evaluation, -1 all, 0 none (default {d.val_batches})")
    s.add_argument("--steps-per-eval", type=int, help=f"steps between validations (default {d.steps_per_eval})")
    s.add_argument("--save-every", type=int, help=f"steps between saves (default {d.save_every})")
    s.add_argument("--steps-per-report", type=int, help=f"steps between progress reports (default {d.steps_per_report})")
    s.add_argument("--seed", type=int, help=f"seed of the LoRA init, data order, split and dropout (default {d.seed})")
    s.add_argument("--on-bad-row", choices=["fail", "skip"],
                   help="a bad data row (reported as FILE:LINE) stops the run or is skipped (default fail)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="training dtype of the base weights (default float32)")
    s.add_argument("--no-progress", action="store_true", help="report lines instead of a progress bar")
    s.set_defaults(func=_cmd_lora)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pmod", description="Run, convert and inspect p-MoD models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("convert", help="convert an official p-MoD / LLaVA or a llava-hf checkpoint to a pmod directory")
    s.add_argument("src", help="official checkpoint directory (config.json + safetensors or .bin)")
    s.add_argument("dst", help="output pmod directory (must not exist)")
    s.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="weight dtype on disk (default: the source's, float16 for float32 sources)")
    s.add_argument("--vision-tower", metavar="CLIP_DIR", default=None,
                   help="Hugging Face CLIPVisionModel / CLIPModel directory whose vision tower goes into DST "
                        "(official checkpoints without their own; llava-hf checkpoints carry theirs)")
    s.add_argument("--quantize", type=int, choices=[4, 8], default=None, metavar="{4,8}",
                   help="MLX affine quantization (4 or 8 bits) of the decoder's and projector's linears and the "
                        "LM head; routers, norms, embeddings and the vision tower stay float (MLX backend only). "
                        "SRC may also be a float pmod checkpoint")
    s.add_argument("--group-size", type=int, choices=[32, 64, 128], default=None, metavar="{32,64,128}",
                   help="weights sharing one scale and bias with --quantize (default 64); a linear whose input "
                        "size it does not divide stays float")
    s.add_argument("--dequantize", action="store_true",
                   help="SRC is a quantized pmod checkpoint: write its float copy (for the torch/ONNX backends)")
    s.set_defaults(func=_cmd_convert)

    s = sub.add_parser("info", help="print a model's config and per-layer schedule")
    s.add_argument("model", nargs="?", help="pmod checkpoint directory")
    s.add_argument("--system", action="store_true", help="also print the runtimes and BLAS in use")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("flops", help="analytic TFLOPs and KV cache, dense vs p-MoD")
    s.add_argument("model", nargs="?", help="pmod checkpoint directory (or use --preset)")
    s.add_argument("--preset", help="a named model shape instead of a directory (e.g. llava-next-7b)")
    s.add_argument("--vision-tokens", type=int, default=2880)
    s.add_argument("--text-tokens", type=int, default=0)
    s.add_argument("--kv-dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    _add_retention(s)
    s.set_defaults(func=_cmd_flops)

    s = sub.add_parser("bench", help="measure dense vs p-MoD per backend: prefill, decode, KV cache, memory, FLOP/s")
    s.add_argument("--model", help="pmod checkpoint directory (onnx and trt export it once, cached)")
    s.add_argument("--preset", help="a seeded random-weight model, built once and cached: tiny, embedded, "
                                    "next-proxy, next-7b")
    s.add_argument("--backend", default="mlx,torch,onnx,trt",
                   help="comma-separated backends; one not installed is skipped (default: %(default)s)")
    s.add_argument("--vision-tokens", metavar="N[,N...]",
                   help="routed vision tokens per prefill, one count or a list (default 576,1440,2880,5760 "
                        "with --model, the preset's own with --preset)")
    s.add_argument("--text-tokens", type=int, help="text tokens around the vision block (default 64, or the preset's)")
    s.add_argument("--decode-tokens", type=int, default=32, help="greedy decode steps after each prefill (default 32)")
    s.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up (default 3)")
    s.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="compute dtype (default: each backend's, float32 on CPU)")
    s.add_argument("--device", default=None,
                   help="the torch runs: cpu (default) or cuda[:N]")
    s.add_argument("--profile", action="store_true",
                   help="also time each decoder layer, a MoD layer split into route / attention / mlp / merge")
    _add_retention(s, "; onnx and trt export and build the graphs at S, cached per S")
    s.add_argument("--json", metavar="OUT", help="write every figure, the machine and the versions as JSON")
    s.add_argument("--plot", metavar="OUT.png", help="plot prefill latency and the p-MoD speedup (needs matplotlib)")
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("generate", help="answer one prompt (optionally with images), streamed to stdout")
    s.add_argument("--model", help="pmod checkpoint directory (default: the embedded model)")
    s.add_argument("--prompt", required=True, help="the user's message (the chat template is applied)")
    s.add_argument("--image", action="append", help="an image for the prompt (repeat for several)")
    s.add_argument("--verbose", action="store_true", help="statistics to stderr")
    _add_sampling(s)
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("chat", help="multi-turn chat in the terminal (/image PATH, /reset, /exit)")
    s.add_argument("--model", help="pmod checkpoint directory (default: the embedded model)")
    _add_sampling(s)
    s.set_defaults(func=_cmd_chat)

    s = sub.add_parser("export", help="export a pmod checkpoint to ONNX or a Triton repository, lint graphs for TensorRT")
    export = s.add_subparsers(dest="export_command", required=True, parser_class=_Parser)
    e = export.add_parser("onnx", help="write ONNX graphs (vision, prefill, decode, embed) and a manifest")
    e.add_argument("--model", help="pmod checkpoint directory (default: the embedded model)")
    e.add_argument("--out", required=True, help="output directory (must not exist)")
    e.add_argument("--max-vision-tokens", type=int, default=None,
                   help="N: most routed vision tokens a prefill chunk may hold; the graphs follow each chunk's "
                        "own count up to N (default: those of the largest single image the model takes)")
    e.add_argument("--target", choices=list(TARGETS), default=DEFAULT_TARGET,
                   help="ort: ONNX Runtime's fused attention (--backend onnx); trt: graphs for 'pmod trt build' "
                        "(default ort)")
    e.add_argument("--buckets", default=None, metavar="B1,B2,...|geometric",
                   help="one prefill graph per vision bucket with constant TopK sizes (the engine takes the "
                        "smallest bucket >= n); the last bucket is N; 'geometric': N/8, N/4, N/2, N")
    e.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="graph dtype")
    e.add_argument("--max-context", type=int, default=None,
                   help="longest context the graphs serve (default: max_position_embeddings)")
    _add_retention(e, "; the graphs are built for S and the manifest records it")
    e.set_defaults(func=_cmd_export_onnx)
    e = export.add_parser("lint", help="TensorRT-compatibility lint of a --target trt export or a .onnx file")
    e.add_argument("path", help="export directory or .onnx file")
    e.set_defaults(func=_cmd_export_lint)
    e = export.add_parser("triton", help="write a Triton Inference Server model repository (Python backend, "
                                         "streamed replies) over a checkpoint, export or engine directory")
    e.add_argument("--model", help="what --backend opens: a pmod checkpoint (mlx, torch), a 'pmod export onnx' "
                                   "directory (onnx) or a 'pmod trt build' directory (trt); default: the embedded model")
    e.add_argument("--backend", required=True, choices=["trt", "onnx", "torch", "mlx"])
    e.add_argument("--out", required=True, help="output repository directory (must not exist)")
    e.add_argument("--name", default="pmod", help="the model's name in the repository (default %(default)s)")
    e.add_argument("--instances", type=int, default=1, help="model instances, each its own process (default 1)")
    e.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help="requests that may wait for an instance; more are refused at once (default: no limit)")
    e.add_argument("--device", default=None,
                   help="torch: cpu (default) or cuda[:N]; onnx: cpu (default) or cuda; trt: cuda (GPU 0)")
    e.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="compute dtype (default: the backend's)")
    e.add_argument("--copy", action="store_true",
                   help="copy the model directory into the repository instead of recording its absolute path")
    e.set_defaults(func=_cmd_export_triton)

    s = sub.add_parser("trt", help="build TensorRT engines from an ONNX export (needs an NVIDIA GPU and TensorRT)")
    trt = s.add_subparsers(dest="trt_command", required=True, parser_class=_Parser)
    e = trt.add_parser("build", help="build one engine per exported graph, with profiles from its manifest")
    e.add_argument("--onnx", required=True, help="ONNX export directory written by 'pmod export onnx --target trt'")
    e.add_argument("--out", required=True, help="output engine directory (must not exist)")
    e.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="fp32 (a float32 export), fp16 (a float16 export, strongly typed), bf16 (a float32 "
                        "export, TensorRT 10, compute capability 8.0+); default fp32")
    e.add_argument("--workspace", type=float, default=None, metavar="GB",
                   help="builder workspace memory limit in GiB (default: TensorRT's)")
    e.add_argument("--timing-cache", default=None, metavar="FILE",
                   help="start from this timing cache when it exists, and update it (one is always written to --out)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_trt_build)

    s = sub.add_parser("server", help="local OpenAI-compatible server (/v1/chat/completions)")
    s.add_argument("--model", help="pmod checkpoint directory (default: the embedded model)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    _add_sampling(s)
    from pmod.app.caches import DEFAULT_PROMPT_CACHE_BYTES, DEFAULT_VISION_CACHE_BYTES
    from pmod.app.serve.server import DEFAULT_MAX_BATCH

    s.add_argument("--prompt-cache-bytes", type=int, default=DEFAULT_PROMPT_CACHE_BYTES, metavar="N",
                   help="KV state of recent conversations kept for requests that extend them, at most N bytes "
                        f"(default {DEFAULT_PROMPT_CACHE_BYTES >> 20} MiB; 0: off)")
    s.add_argument("--vision-cache-bytes", type=int, default=DEFAULT_VISION_CACHE_BYTES, metavar="N",
                   help="projected features (and preprocessed pixels) of recent images, at most N bytes "
                        f"(default {DEFAULT_VISION_CACHE_BYTES >> 20} MiB; 0: off)")
    s.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                   help=f"requests decoded together where the backend batches (default {DEFAULT_MAX_BATCH}; "
                        "1: one at a time)")
    s.set_defaults(func=_cmd_server)

    s = sub.add_parser("demo", help="the embedded model answers questions about an image and shows what p-MoD kept")
    s.add_argument("--model", help="pmod checkpoint directory (default: the embedded model)")
    s.add_argument("--image", help="your own image (default: a drawn sample of the shapes task)")
    s.add_argument("--prompt", help="your own question about --image")
    s.add_argument("--out", help="directory for the routing picture (default: current directory)")
    s.add_argument("--sample", type=int, default=0, help="which drawn sample of the shapes task")
    s.add_argument("--questions", type=int, default=4, help="questions about a drawn sample")
    _add_sampling(s)
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("lora", help="LoRA-finetune a model (MLX) on LLaVA conversation JSONL, routers included")
    _add_lora(s)

    s = sub.add_parser("fuse", help="merge a LoRA adapter into a new pmod checkpoint, loadable by every backend (a "
                                    "quantized base: the adapted linears are dequantized, merged and quantized "
                                    "again; MLX only)")
    s.add_argument("--model", help="base pmod checkpoint directory (default: the embedded model)")
    s.add_argument("--adapter-path", required=True, help="adapter directory written by 'pmod lora'")
    s.add_argument("--out", required=True, help="output pmod checkpoint directory (must not exist)")
    s.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="weight dtype on disk (default: the base checkpoint's)")
    s.set_defaults(func=_cmd_fuse)
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if hasattr(args, "model") and args.command in ("generate", "chat", "server", "demo"):
            from pmod.app.models import resolve_model

            args.model = str(resolve_model(args.model))
        args.func(args)
    except BadSetting as e:  # the core names the setting; here it is the flag the user typed
        print(f"pmod: error: {e.worded()}", file=sys.stderr)
        return 2
    except PmodError as e:
        print(f"pmod: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pmod: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
