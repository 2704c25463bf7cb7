"""The Ansible role applied to two booted systems, as a fleet operator runs it: a canary box
and the rest, each group pinned to its own revision of a model on a loopback hub. The canary
play finishes (its box serves) before the rest start; a second run changes nothing.

Ansible runs here with a local connection; each box's Python interpreter is a wrapper that
enters the box (`nsenter`), and Ansible's remote temporary directory is one the boxes share
with the host, so the modules it writes are there for the wrapper to run inside.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import REPO
from waits import HANG_S

from edgeagent.store.manifest import Manifest
from system.booted import (
    EDGEAGENT,
    NEEDS_ROOT,
    ROOTS,
    BootedSystem,
    ansible_interpreter,
    booted,
    wait_for,
)

pytestmark = [
    pytest.mark.system,
    # Only a hang guard: two booted boxes, two playbook runs, engines started take ~5 min on a
    # quiet box; CI machines may be 6x slower.
    pytest.mark.timeout(3600),
    NEEDS_ROOT,
]  # fmt: skip
HUB_PORT = 18080


def test_the_role_rolls_out_canary_first_and_a_second_run_changes_nothing(
    tmp_path: Path, tiny_model: Path, tiny_model_b: Path, tiny_4bit: Manifest,
    tiny_4bit_b: Manifest,
) -> None:  # fmt: skip
    shared = ROOTS / f"ansible-{uuid.uuid4().hex[:8]}"
    shared.mkdir(parents=True)
    specs = (f"edge/tiny={tiny_model}", f"edge/tiny={tiny_model_b}")
    try:
        with (
            booted("canary", shared) as canary, booted("rest", shared) as rest,
            canary.hub(HUB_PORT, *specs) as commits, rest.hub(HUB_PORT, *specs),
        ):  # fmt: skip
            old, new = commits
            first = _playbook(tmp_path, shared, canary, rest, fleet=old, canary_revision=new)
            second = _playbook(tmp_path, shared, canary, rest, fleet=old, canary_revision=new)
            canary_serves = wait_for("the canary serving", lambda: canary.served_version())
            rest_serves = wait_for("the rest serving", lambda: rest.served_version())
            canary_active = canary.show("ActiveState")
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert first.returncode == 0, first.stdout[-4000:]
    plays = first.stdout
    assert plays.index("PLAY [Canary boxes]") < plays.index("PLAY [The rest of the fleet]")
    assert plays.index("TASK [edgeagent : Wait until edgeagent serves]") < plays.index(
        "PLAY [The rest of the fleet]"
    )  # the canary serves before the rest is touched
    assert (canary_serves, rest_serves) == (tiny_4bit_b.version, tiny_4bit.version)
    assert canary_active == "active"
    assert second.returncode == 0, second.stdout[-4000:]
    assert re.findall(r"changed=(\d+)", second.stdout) == ["0", "0"], second.stdout[-2000:]


def _playbook(
    tmp_path: Path, shared: Path, canary: BootedSystem, rest: BootedSystem, *, fleet: str,
    canary_revision: str,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    inventory = tmp_path / "inventory"
    (inventory / "group_vars").mkdir(parents=True, exist_ok=True)
    common = (
        f"ansible_connection=local ansible_remote_tmp={shared}/remote "
        f"edgeagent_exec={EDGEAGENT} edgeagent_stage_dir=/var/tmp/edgeagent-install "
        f"edgeagent_hub_endpoint=http://127.0.0.1:{HUB_PORT} edgeagent_hub_repo=edge/tiny "
        f"edgeagent_health_wait_s={HANG_S:.0f}"
    )
    (inventory / "hosts.ini").write_text(
        f"[canary]\nbox-canary ansible_python_interpreter="
        f"{ansible_interpreter(canary, shared, 'canary')} {common}\n\n"
        f"[rest]\nbox-2 ansible_python_interpreter={ansible_interpreter(rest, shared, 'rest')} "
        f"{common}\n\n[fleet:children]\ncanary\nrest\n"
    )
    (inventory / "group_vars/fleet.yml").write_text(f"edgeagent_hub_revision: {fleet}\n")
    (inventory / "group_vars/canary.yml").write_text(f"edgeagent_hub_revision: {canary_revision}\n")
    playbook = Path(sys.executable).parent / "ansible-playbook"
    return subprocess.run(
        [str(playbook), "-i", str(inventory), str(REPO / "deploy/ansible/site.yml"),
         "-e", "ansible_become=false"],
        capture_output=True, text=True, timeout=3 * HANG_S, check=False,  # two boxes' starts
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(tmp_path / "at"),
             "PATH": f"{playbook.parent}:{os.environ['PATH']}"},
    )  # fmt: skip
