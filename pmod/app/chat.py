"""``pmod chat``: a multi-turn REPL that keeps the per-layer caches across turns."""

from __future__ import annotations

import sys

from pmod.errors import PmodError
from pmod.app.generate import Sampler, SamplerArgs

HELP = "commands: /image PATH (attach to the next message), /reset, /exit"


def run_chat(args, stdin=None, stdout=None, stderr=None) -> None:
    from pmod.image import load_image
    from pmod.app.session import session_from_args

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    sampler = Sampler(SamplerArgs(args.temp, args.top_p, args.seed))
    session = session_from_args(args)
    print(f"pmod chat: {args.model} ({args.backend}). {HELP}", file=stderr)
    pending = []
    interactive = stdin.isatty()
    while True:
        if interactive:
            print(">> ", end="", file=stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd == "/exit":
                break
            if cmd == "/reset":
                session.reset()
                pending = []
                print("(context cleared)", file=stderr)
            elif cmd == "/image":
                try:
                    pending.append(load_image(arg.strip()))
                    print(f"(image attached: {arg.strip()})", file=stderr)
                except PmodError as e:
                    print(f"pmod: error: {e}", file=stderr)
            else:
                print(f"unknown command {cmd}; {HELP}", file=stderr)
            continue
        try:
            for piece in session.ask(line, images=pending, max_tokens=args.max_tokens, sampler=sampler):
                stdout.write(piece)
                stdout.flush()
            stdout.write("\n")
            stdout.flush()
        except PmodError as e:  # a bad turn (e.g. over the context) keeps the chat going
            print(f"pmod: error: {e}", file=stderr)
        pending = []
