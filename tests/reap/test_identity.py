"""Reap's identity check where /proc does not show the planned process: a skip that says why, never a
traceback and never "has exited" for a process that is still running."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess

import pytest

from tests.conftest import Nobody, Spawn
from tests.reap.helpers import start_python
from tests.reap.test_reap import reap_plan

# Apply a plan made by root, as user nobody, with every method; one JSON line of outcomes per method.
APPLY = """
import dataclasses, json, pickle, sys
from closewait import reap
plan = pickle.loads(bytes.fromhex(sys.argv[1]))
for method in reap.Method:
    result = reap.apply(dataclasses.replace(plan, method=method))
    print(json.dumps([[o.outcome.value, o.code, o.reason] for o in result.outcomes]))
"""


@pytest.mark.parametrize(("option", "words"), [("hidepid=invisible", "does not show it"), ("hidepid=noaccess", "")])
def test_a_process_proc_hides_is_skipped_as_identity_unknown(
    spawn: Spawn, nobody: Nobody, option: str, words: str
) -> None:
    """In a mount namespace of its own, /proc is mounted again with ``hidepid``; nobody applies a plan
    against root's leaking server. The server is alive, so "process-gone" would be a lie."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    server = start_python(spawn)
    server.leak(1)
    plan = reap_plan(server)
    (target,) = plan.targets
    script = f'mount -t proc -o {option} proc /proc && exec "$@"'
    in_private_mounts = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    done = subprocess.run(
        [*in_private_mounts, *nobody.argv, "-c", APPLY, pickle.dumps(plan).hex()],
        env=nobody.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    if done.returncode != 0 and "mount" in done.stderr and "Traceback" not in done.stderr:
        pytest.skip(f"cannot mount /proc with {option} here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2  # shutdown, destroy
    for line in lines:
        ((outcome, code, reason),) = json.loads(line)
        assert (outcome, code) == ("skipped", "identity-unknown"), reason
        assert f"pid {target.process.pid}" in reason
        assert "exited" not in reason
        assert words in reason
    if option == "hidepid=invisible":
        assert "(mounted with hidepid=" in json.loads(lines[0])[0][2]
    assert server.alive()
    assert len(server.close_wait()) == 1  # nothing was released
