"""The child processes of ``pmod bench`` and how they talk to the parent.

Exports and workers run in fresh interpreters with the pmod being run first on the path.
A worker prints one JSON object per line after :data:`MARK` (``info``, ``row``,
``profile``, ``peak`` or ``error``); every other line of its stdout is ignored, and its
stderr is kept for the error line when it dies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pmod.errors import PmodError

MARK = "@@pmod-bench "


def proc_kib(file: str, key: str) -> int | None:
    """Bytes of a ``key:  N kB`` line of a Linux ``/proc`` file; None where there is none."""
    try:
        for line in Path(file).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def note(msg: str) -> None:
    print(f"pmod bench: {msg}", file=sys.stderr, flush=True)


def emit(**obj) -> None:
    """One worker message on stdout."""
    print(MARK + json.dumps(obj), flush=True)


def child_env() -> dict:
    """This environment, with the pmod being run first on the path (a checkout runs as itself)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_pmod(args: list[str], what: str) -> None:
    """Run a ``pmod`` subcommand in a fresh interpreter (torch stays out of this process)."""
    r = subprocess.run([sys.executable, "-m", "pmod", *args], capture_output=True, text=True, env=child_env())
    if r.returncode:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {r.returncode}"
        raise PmodError(f"{what} failed: {last.removeprefix('pmod: error: ')}")


def spawn_worker(spec: dict, on_row) -> dict:
    """Run one worker; collect its messages, calling ``on_row`` as each row arrives."""
    out = dict(info=None, rows=[], profile=[], peak=None)
    label = f"{spec['backend']} ({'dense' if spec['mode'] == 'dense' else 'p-MoD'})"
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pmod.app.bench", "--worker", json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=child_env())
        try:
            for line in proc.stdout:
                if not line.startswith(MARK):
                    continue
                msg = json.loads(line[len(MARK):])
                if "error" in msg:
                    raise PmodError(f"{label}: {msg['error']}")
                if "row" in msg:
                    out["rows"].append(msg["row"])
                    on_row(msg["row"])
                elif "profile" in msg:
                    out["profile"].append(msg["profile"])
                else:
                    out.update(msg)
            rc = proc.wait()
        finally:
            if proc.poll() is None:  # an error or an interrupt: stop the worker
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if rc:
            err.seek(0)
            lines = [ln for ln in err.read().splitlines() if ln.strip()]
            why = "killed (out of memory?)" if rc == -9 else f"exit status {rc}"
            raise PmodError(f"the {label} benchmark failed ({why}): {lines[-1] if lines else 'no output'}")
    return out
