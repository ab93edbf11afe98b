"""The ``pmod`` command. Runtimes are imported only inside the subcommands that need them.

Every error is one line, ``pmod: error: <message>``, with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import PmodError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors follow the same one-line rule
        raise PmodError(f"{message} (see '{self.prog} --help')")


def _cmd_info(args) -> None:
    from .info import print_info

    print_info(args.model, system=args.system)


def _cmd_convert(args) -> None:
    from .convert import convert_checkpoint

    dst = convert_checkpoint(args.src, args.dst, dtype=args.dtype, vision_tower=args.vision_tower)
    print(f"wrote {dst}", file=sys.stderr)


def _cmd_flops(args) -> None:
    from .flops import print_flops

    print_flops(args)


def _cmd_generate(args) -> None:
    from .generate import run_generate

    run_generate(args)


def _cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args)


def _cmd_chat(args) -> None:
    from .chat import run_chat

    run_chat(args)


def _cmd_server(args) -> None:
    from .server import run_server

    run_server(args)


def _export_module(name: str):
    """A ``pmod_export`` module, or a one-line error saying which extra to install."""
    import importlib

    try:
        return importlib.import_module(f"pmod_export.{name}")
    except ImportError as e:
        if e.name and e.name.startswith("pmod_export."):
            raise
        raise PmodError(f"pmod export needs torch and onnx ({e.name or e} is missing): pip install 'pmod[export]'") from None


def _cmd_export_onnx(args) -> None:
    dst = _export_module("onnx_export").export_onnx(
        args.model, args.out, args.max_vision_tokens, dtype=args.dtype, max_context=args.max_context)
    print(f"wrote {dst}", file=sys.stderr)


def _cmd_export_lint(args) -> None:
    findings = _export_module("lint").lint_path(args.path)
    for f in findings:
        print(f)
    if findings:
        raise PmodError(f"{len(findings)} TensorRT-compatibility problem(s) in {args.path} (listed above)")
    print(f"{args.path}: no TensorRT-compatibility problems", file=sys.stderr)


def _add_sampling(s) -> None:
    from .engine import BACKENDS

    s.add_argument("--backend", default="mlx", choices=list(BACKENDS),
                   help="runtime: mlx or torch (--model is a pmod checkpoint), onnx (--model is a "
                        "'pmod export onnx' directory)")
    s.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="compute dtype (default: float32 on CPU, float16 on Metal)")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temp", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)


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
    s.set_defaults(func=_cmd_flops)

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

    s = sub.add_parser("export", help="export a pmod checkpoint to ONNX, lint graphs for TensorRT")
    export = s.add_subparsers(dest="export_command", required=True, parser_class=_Parser)
    e = export.add_parser("onnx", help="write ONNX graphs (vision, prefill, decode, embed) and a manifest")
    e.add_argument("--model", required=True, help="pmod checkpoint directory")
    e.add_argument("--out", required=True, help="output directory (must not exist)")
    e.add_argument("--max-vision-tokens", type=int, required=True,
                   help="N: most routed vision tokens a prefill chunk may hold (fixes every MoD capacity)")
    e.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="graph dtype")
    e.add_argument("--max-context", type=int, default=None,
                   help="longest context the graphs serve (default: max_position_embeddings)")
    e.set_defaults(func=_cmd_export_onnx)
    e = export.add_parser("lint", help="TensorRT-compatibility lint of an export directory or .onnx file")
    e.add_argument("path", help="export directory or .onnx file")
    e.set_defaults(func=_cmd_export_lint)

    s = sub.add_parser("server", help="local OpenAI-compatible server (/v1/chat/completions)")
    s.add_argument("--model", help="pmod checkpoint directory (default: the embedded model)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    _add_sampling(s)
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
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if hasattr(args, "model") and args.command in ("generate", "chat", "server", "demo"):
            from .models import resolve_model

            args.model = str(resolve_model(args.model))
        args.func(args)
    except PmodError as e:
        print(f"pmod: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pmod: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
