"""The unit, the one-box installer and the fleet role, run for real into scratch roots.

`systemd-analyze` checks the installed unit (verify, and a security exposure of at most 2.0);
`deploy/install.sh` is run twice (the second run changes nothing) and `deploy/uninstall.sh`
keeps the model store unless asked; the Ansible playbook installs two boxes of an inventory
(a canary first) into scratch roots, each with its group's pinned revision, and a second run
changes nothing; `ansible-lint` passes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from waits import HANG_S

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="useradd/groupadd into a scratch root need root"
)
EXEC = Path(sys.executable).parent / "edgeagent"
UNIT = "etc/systemd/system/edgeagent.service"
MAX_EXPOSURE = 2.0


def _scratch_root(path: Path) -> Path:
    """A file system tree with just what useradd and systemctl --root need."""
    (path / "etc").mkdir(parents=True)
    (path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (path / "etc/group").write_text("root:x:0:\n")
    (path / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (path / "etc/gshadow").write_text("root:*::\n")
    return path


def _install(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "deploy/install.sh"), "--root", str(root), "--exec", str(EXEC),
         "--no-start", *extra],
        capture_output=True, text=True, timeout=HANG_S, check=False,
    )  # fmt: skip


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path's mode and content (or link target): what a re-run must not change."""
    seen = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        if path.is_symlink():
            content = os.readlink(path)
        elif path.is_file():
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = ""
        seen[str(path.relative_to(root))] = (mode, content)
    return seen


def test_installed_unit_verifies_and_scores_at_most_2(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed (Debian: apt-get install systemd)"
    root = _scratch_root(tmp_path / "root")
    assert _install(root).returncode == 0
    unit = root / UNIT

    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            check=False)  # fmt: skip
    security = subprocess.run(
        [analyze, "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}",
         str(unit)], capture_output=True, text=True, check=False,
    )  # fmt: skip

    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == ""
    exposure = float(re.findall(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)[0])
    assert security.returncode == 0, security.stdout[-2000:]
    assert exposure <= MAX_EXPOSURE
    assert f"ExecStart={EXEC} serve" in unit.read_text()
    print(f"\nsystemd-analyze security: exposure {exposure}")


def test_install_is_idempotent_and_uninstall_keeps_the_store(tmp_path: Path) -> None:
    root = _scratch_root(tmp_path / "root")
    first = _install(root)
    before = _snapshot(root)
    second = _install(root)
    after = _snapshot(root)

    assert first.returncode == 0, first.stderr
    assert "user edgeagent" in first.stdout
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "edgeagent install: nothing to change"
    assert after == before
    assert re.search(r"^edgeagent:x:\d+:\d+:", (root / "etc/passwd").read_text(), re.M)
    groups = (root / "etc/group").read_text()
    assert re.search(r"^edgeagent:", groups, re.M)
    assert re.search(r"^edgeagent-clients:", groups, re.M)
    credentials = root / "etc/edgeagent/credentials"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o700
    assert stat.S_IMODE((credentials / "hub_token").stat().st_mode) == 0o600
    assert (root / "etc/systemd/system/multi-user.target.wants/edgeagent.service").is_symlink()
    assert os.readlink(root / "usr/local/bin/edgeagent") == str(EXEC)

    (root / "etc/edgeagent/edgeagent.toml").write_text('[hub]\nrevision = "pinned"\n')
    store = root / "var/lib/edgeagent/models/versions/abc"
    store.mkdir(parents=True)
    third = _install(root)
    assert (root / "etc/edgeagent/edgeagent.toml").read_text() == '[hub]\nrevision = "pinned"\n'
    assert "nothing to change" in third.stdout

    uninstall = REPO / "deploy/uninstall.sh"
    kept = subprocess.run(["bash", str(uninstall), "--root", str(root)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert kept.returncode == 0, kept.stderr
    assert not (root / UNIT).exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/edgeagent.service").exists()
    assert not (root / "usr/local/bin/edgeagent").is_symlink()
    assert store.is_dir()
    assert (root / "etc/edgeagent/edgeagent.toml").is_file()

    purged = subprocess.run(["bash", str(uninstall), "--root", str(root), "--purge"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert purged.returncode == 0, purged.stderr
    assert not (root / "var/lib/edgeagent").exists()
    assert not (root / "etc/edgeagent").exists()
    assert "edgeagent" not in (root / "etc/passwd").read_text()
    assert "edgeagent" not in (root / "etc/group").read_text()


def test_the_fleet_playbook_installs_canary_first_with_each_groups_revision(
    tmp_path: Path,
) -> None:
    """Two boxes (scratch roots on this machine), as in the example inventory: `box-canary` in
    canary, `box-2` in rest, both in fleet. The canary play runs first; each config pins its
    group's revision (the canary's overrides the fleet's)."""
    inventory = tmp_path / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    boxes = {name: _scratch_root(tmp_path / name) for name in ("box-canary", "box-2")}
    common = (f"ansible_connection=local ansible_python_interpreter={sys.executable} "
              f"edgeagent_exec={EXEC} edgeagent_stage_dir={tmp_path / 'stage'}")  # fmt: skip
    (inventory / "hosts.ini").write_text(
        f"[canary]\nbox-canary edgeagent_root={boxes['box-canary']} {common}\n\n"
        f"[rest]\nbox-2 edgeagent_root={boxes['box-2']} {common}\n\n"
        f"[fleet:children]\ncanary\nrest\n"
    )
    (inventory / "group_vars/fleet.yml").write_text("edgeagent_hub_revision: 1111111fleet\n")
    (inventory / "group_vars/canary.yml").write_text("edgeagent_hub_revision: 2222222canary\n")
    site = REPO / "deploy/ansible/site.yml"
    playbook = [str(EXEC.parent / "ansible-playbook"), "-i", str(inventory), str(site),
                "-e", "ansible_become=false"]  # fmt: skip
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "PATH": f"{EXEC.parent}:{os.environ['PATH']}",
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp")}  # fmt: skip

    first = subprocess.run(playbook, capture_output=True, text=True, env=env, timeout=HANG_S,
                           check=False)  # fmt: skip
    second = subprocess.run(playbook, capture_output=True, text=True, env=env, timeout=HANG_S,
                            check=False)  # fmt: skip

    assert first.returncode == 0, first.stdout[-3000:]
    assert first.stdout.index("PLAY [Canary boxes]") < first.stdout.index(
        "PLAY [The rest of the fleet]"
    )
    canary_config = (boxes["box-canary"] / "etc/edgeagent/edgeagent.toml").read_text()
    fleet_config = (boxes["box-2"] / "etc/edgeagent/edgeagent.toml").read_text()
    assert 'revision = "2222222canary"' in canary_config
    assert 'revision = "1111111fleet"' in fleet_config
    for root in boxes.values():
        assert (root / UNIT).is_file()
        assert "edgeagent:" in (root / "etc/passwd").read_text()
    assert second.returncode == 0, second.stdout[-3000:]
    assert re.findall(r"changed=(\d+)", second.stdout) == ["0", "0"], second.stdout[-1500:]


def test_ansible_lint_passes() -> None:
    lint = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-lint")], cwd=REPO / "deploy/ansible",
        capture_output=True, text=True, timeout=HANG_S, check=False,
    )  # fmt: skip
    assert lint.returncode == 0, lint.stdout[-3000:] + lint.stderr[-3000:]
