"""The guard of every test module that runs torch in a process where pmod_mlx may have loaded
OpenBLAS first (``pmod_export.torch_loader``).

If another test module imported torch plainly after pmod_mlx, torch in this process would
crash; the module's tests then skip and ``test_in_a_fresh_process`` runs the module in a
fresh interpreter instead. Use it as::

    MISBOUND, _torch_usable, test_in_a_fresh_process = torch_guard.guard(__file__)

(module-scoped fixtures run before the autouse gate: they call ``skip_if(MISBOUND)``).
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def guard(module_file: str):
    """``(misbound, autouse fixture, fresh-process test)`` for the test module ``module_file``."""
    from pmod_export import torch_loader

    misbound = torch_loader.clash()

    @pytest.fixture(autouse=True)
    def _torch_usable(request):
        if misbound and request.node.name != "test_in_a_fresh_process":
            pytest.skip("run by test_in_a_fresh_process: " + misbound)

    @pytest.mark.skipif(not misbound, reason="torch is usable in this process")
    def test_in_a_fresh_process():
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module_file],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]

    return misbound, _torch_usable, test_in_a_fresh_process


def skip_if(misbound) -> None:
    """For module-scoped fixtures, which run before the autouse gate."""
    if misbound:
        pytest.skip("run by test_in_a_fresh_process: " + misbound)
