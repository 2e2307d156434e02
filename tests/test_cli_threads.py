"""The CLI's OpenMP spin policy: a fresh CLI process shortens the runtime's idle spinning
(GOMP_SPINCOUNT) before torch loads, unless the user chose a policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import os, tritonmerge.cli, torch; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def _probe(**env_over):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(env_over)
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120).stdout.split()


def test_cli_shortens_spinning_by_default():
    assert _probe() == ["10000", "None"]


@pytest.mark.parametrize("var, value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000")])
def test_a_users_policy_wins(var, value):
    out = _probe(**{var: value})
    assert out == (["None", value] if var == "OMP_WAIT_POLICY" else [value, "None"])


def test_not_touched_when_torch_is_already_loaded():
    code = "import os, torch, tritonmerge.cli; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout.split() == ["None"]
