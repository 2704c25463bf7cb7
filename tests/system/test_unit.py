"""The real unit (systemd/edgeagent.service, every sandboxing option applied) under a real
systemd, installed by deploy/install.sh as an operator would, serving the real CPU engine.

One booted system for the module: installing builds the embedded model with AutoRound inside
the unit (from the session's trained fp16 model, put in the unit's cache) and compiles vLLM's
graphs, which is the expensive part. The tests run in file order
and each leaves the unit serving for the next; uninstalling comes last.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from real_daemon import start_daemon
from waits import HANG_S

from edgeagent.demo.tiny import EMBEDDED_MODEL_ID
from edgeagent.sources.build import EMBEDDED_RECIPE
from edgeagent.store.manifest import Manifest
from system.booted import EDGEAGENT, NEEDS_ROOT, REPO_INSIDE, BootedSystem, booted, wait_for
from system.mender import (
    FACTORY_ARTIFACT,
    MODULE,
    Apps,
    installed_artifact,
    mender,
    module_journal,
    now,
    set_up_mender,
    with_release_notes,
    with_shuffled_head,
    write_artifact,
)

pytestmark = [
    pytest.mark.system,
    # Only a hang guard: the first test carries the install (training and building the embedded
    # model, then its engine's start: ~5 min on a quiet box); CI machines may be 6x slower.
    pytest.mark.timeout(3600),
    NEEDS_ROOT,
]  # fmt: skip

TOKEN = "sys-test-token-7f3a9c"  # the api_token credential: must never reach the journal
CONFIG = """\
log_level = "INFO"
[server]
tcp_address = "127.0.0.1:50051"
drain_grace_s = 60.0
[model]
source = "embedded"
kv_cache_gib = 0.25
max_num_seqs = 8
health_check_s = 2.0
[metrics]
address = "127.0.0.1:9464"
[updates]
probation_s = 0
hold_s = 30.0
quality_gate = false  # these updates go to random-weight models; the gate has its own tests
"""
# A watchdog test must not wait the unit's 60 s, and these tests crash and restart the unit more
# often than the start limit allows a box in 10 minutes; everything else is the shipped unit.
DROP_IN = "[Unit]\nStartLimitBurst=50\n[Service]\nWatchdogSec=15\n"
UNIT = "edgeagent.service"


@dataclass
class Installed:
    system: BootedSystem
    install: subprocess.CompletedProcess[str]
    ready_s: float  # `systemctl start` (by install.sh) to READY, on an empty store
    statuses: list[str] = field(default_factory=list)  # StatusText seen while starting


@pytest.fixture(scope="module")
def installed(trained_fp16: Path) -> Iterator[Installed]:
    with booted("unit") as system:
        # The fp16 model trained once for the session, in the unit's cache as a box that ran the
        # demo would have it (systemd hands the directory to the unit's user at start): the
        # first start builds with AutoRound but does not train again.
        cached = f"/var/cache/edgeagent/trained/{trained_fp16.name}"
        shutil.copytree(trained_fp16, system.path(cached))
        system.write("/etc/edgeagent/edgeagent.toml", CONFIG)
        system.write("/etc/edgeagent/credentials/api_token", TOKEN, mode=0o600)
        system.write(f"/etc/systemd/system/{UNIT}.d/test.conf", DROP_IN)
        statuses: list[str] = []
        watching = threading.Event()
        watcher = threading.Thread(target=_collect_statuses, args=(system, statuses, watching))
        watcher.start()
        started = time.monotonic()
        try:
            # Hang guards: the first start trains, builds and starts the engine.
            install = system.run(
                "bash", f"{REPO_INSIDE}/deploy/install.sh", "--exec", EDGEAGENT,
                "--health-wait", f"{3 * HANG_S:.0f}", check=False, timeout=4 * HANG_S,
            )  # fmt: skip
        finally:
            watching.set()
            watcher.join()
        ready_s = _ready_after(system) or time.monotonic() - started
        assert install.returncode == 0, install.stdout + install.stderr + system.journal()
        system.run("useradd", "--system", "-G", "edgeagent-clients", "app")
        system.run("useradd", "--system", "outsider")
        yield Installed(system, install, ready_s, statuses)


def _collect_statuses(system: BootedSystem, into: list[str], stop: threading.Event) -> None:
    while not stop.wait(0.3):
        text = system.show("StatusText")
        if text and (not into or into[-1] != text):
            into.append(text)


def _ready_after(system: BootedSystem) -> float | None:
    """Seconds from the unit's start to READY, by systemd's own monotonic timestamps."""
    started = int(system.show("ExecMainStartTimestampMonotonic") or 0)
    ready = int(system.show("ActiveEnterTimestampMonotonic") or 0)
    return (ready - started) / 1e6 if started and ready > started else None


def _generate(system: BootedSystem, user: str = "app", *extra: str) -> str:
    """The CLI's closing line (on stderr): `--- N prompt tokens, M generated in ...`."""
    return system.cli("generate", "Hello", "--max-tokens", "8", *extra, user=user).stderr


def test_install_starts_the_unit_which_builds_with_autoround_and_reaches_ready(
    installed: Installed,
) -> None:
    """The unit starts on an empty store and builds the embedded model with AutoRound inside
    the sandbox, with the embedded recipe (from the trained fp16 model in its cache)."""
    system = installed.system
    served = json.loads(system.cli("models", "show", "current").stdout)
    assert served["version"] == system.served_version()
    assert served["source"]["kind"] == "build"
    assert served["source"]["tool"].startswith("auto-round")
    assert served["source"]["base"] == EMBEDDED_MODEL_ID
    recipe = served["source"]["recipe"]
    assert (recipe["bits"], recipe["group_size"], recipe["iters"]) == (
        EMBEDDED_RECIPE.bits, EMBEDDED_RECIPE.group_size, EMBEDDED_RECIPE.iters,
    )  # fmt: skip
    assert recipe["calibration"]["source"] == "builtin: edgeagent training set"
    assert system.show("ActiveState") == "active"
    assert system.show("Type") == "notify"
    assert system.show("StatusText").startswith("serving ")
    building = [s for s in installed.statuses if s.startswith("job='build ")]
    assert building, installed.statuses  # STATUS= shows the build's progress
    starting = [s for s in installed.statuses if s.startswith("starting the engine on")]
    assert starting, installed.statuses
    assert installed.statuses.index(building[0]) < installed.statuses.index(starting[0])
    assert "edgeagent install: started edgeagent.service" in installed.install.stdout
    print(f"\nunder systemd: start -> READY {installed.ready_s:.1f} s on an empty store "
          f"(build included); statuses seen: {len(installed.statuses)}")  # fmt: skip


def test_a_member_of_the_socket_group_is_served_and_an_outsider_is_refused(
    installed: Installed,
) -> None:
    system = installed.system
    socket = system.run("stat", "-c", "%a %U %G", "/run/edgeagent/edgeagent.sock").stdout.split()
    assert socket == ["660", "edgeagent", "edgeagent-clients"]
    assert "--- " in _generate(system, "app")
    refused = system.cli("generate", "Hello", user="outsider", check=False)
    assert refused.returncode == 3
    assert "permission denied" in refused.stderr.lower(), refused.stderr


def test_the_token_comes_from_load_credential_and_never_reaches_the_journal(
    installed: Installed,
) -> None:
    system = installed.system
    target = ("--target", "127.0.0.1:50051")
    denied = system.cli("generate", "Hello", *target, user="app", check=False)
    allowed = system.run(
        "env", f"EDGEAGENT_CLIENT_TOKEN={TOKEN}", EDGEAGENT, "generate", "Hello",
        "--max-tokens", "4", *target, user="app",
    )  # fmt: skip
    assert denied.returncode == 3
    assert "bearer token" in denied.stderr
    assert "--- " in allowed.stderr
    assert TOKEN not in system.run("journalctl", "--no-pager", "-b").stdout


def test_the_unit_exposure_stays_low(installed: Installed) -> None:
    analysed = installed.system.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", analysed)[1])  # type: ignore[index]
    assert exposure <= 2.0
    print(f"\nexposure of the running unit: {exposure}")


def test_a_dropped_update_is_hot_swapped_inside_the_unit(
    installed: Installed, tiny_model_b: Path, tiny_4bit_b: Manifest
) -> None:
    system = installed.system
    # As an OTA agent does: the files and READY written beside the drop directory (same file
    # system), then the finished directory renamed in.
    staged = system.path("/var/lib/edgeagent/incoming/next")
    shutil.copytree(tiny_model_b, staged, symlinks=False)
    (staged / "READY").touch()
    system.run("chown", "-R", "edgeagent:edgeagent", "/var/lib/edgeagent/incoming")
    staged.rename(system.path("/var/lib/edgeagent/drop/next"))
    wait_for("the dropped version served",
             lambda: system.served_version() == tiny_4bit_b.version)  # fmt: skip
    wait_for("the drop filed as done",
             lambda: system.path("/var/lib/edgeagent/drop/done/next").is_dir())  # fmt: skip
    assert "--- " in _generate(system)
    assert system.show("NRestarts") == "0"


def test_a_hub_fetch_runs_inside_the_unit(installed: Installed, tiny_fp16_b: Path) -> None:
    """The hub runs on loopback in the system's network namespace; the unit (no
    PrivateNetwork) reaches it. Its poller finds the commit, fetches it and swaps to it: a
    model of another layout (fp16), so the engine restarts inside the unit."""
    system = installed.system
    before = system.served_version()
    with system.hub(18080, f"edge/tiny={tiny_fp16_b}"):
        system.write(
            "/etc/edgeagent/edgeagent.toml",
            CONFIG.replace('source = "embedded"', 'source = "hub"')
            + "hub_poll_interval_s = 2.0\n"
            + '[hub]\nrepo = "edge/tiny"\nendpoint = "http://127.0.0.1:18080"\n',
        )
        system.systemctl("restart", UNIT)
        wait_for("the hub's version served",
                 lambda: system.served_version() not in {"", before})  # fmt: skip
    manifest = system.cli("models", "show", "current").stdout
    assert '"edge/tiny"' in manifest
    assert system.served_version() in manifest
    assert "--- " in _generate(system)


def test_the_watchdog_restarts_a_stopped_daemon(installed: Installed) -> None:
    system = installed.system
    restarts = int(system.show("NRestarts"))
    stopped = time.monotonic()
    system.run("kill", "-STOP", system.show("MainPID"))
    # The mechanism is asserted (systemd's "Watchdog timeout"), not the time: a stopped
    # process's abort and core dump take longer on a slower machine.
    wait_for("a restart by the watchdog", lambda: int(system.show("NRestarts")) > restarts)
    restarted_after = time.monotonic() - stopped
    wait_for("serving again", lambda: system.show("StatusText").startswith("serving"))
    assert "--- " in _generate(system)
    assert "Watchdog timeout" in system.journal()
    print(
        f"\nwatchdog: restarted {restarted_after:.1f} s after SIGSTOP",
        "(WatchdogSec=15, RestartSec=5)",
    )


def test_an_engine_death_is_restarted_by_systemd_and_journaled(installed: Installed) -> None:
    system = installed.system
    restarts = int(system.show("NRestarts"))
    core = system.run("pgrep", "-f", "VLLM::EngineCor").stdout.split()
    assert core, "no engine core process"
    system.run("kill", "-KILL", *core)
    wait_for("a restart after the engine died",
             lambda: int(system.show("NRestarts")) > restarts)  # fmt: skip
    wait_for("serving again", lambda: system.show("StatusText").startswith("serving"))
    assert "--- " in _generate(system)
    assert "engine died" in system.journal("-p", "err")


def test_a_sigkilled_daemon_takes_its_engine_processes_with_it(installed: Installed) -> None:
    system = installed.system
    before = set(system.run("pgrep", "-u", "edgeagent").stdout.split())
    restarts = int(system.show("NRestarts"))
    system.run("kill", "-KILL", system.show("MainPID"))
    wait_for("a restart after SIGKILL", lambda: int(system.show("NRestarts")) > restarts)
    left = before & set(system.run("pgrep", "-u", "edgeagent", check=False).stdout.split())
    assert not left, f"processes of the killed daemon still running: {left}"
    wait_for("serving again", lambda: system.show("StatusText").startswith("serving"))
    assert "--- " in _generate(system)


STREAM_S = 8.0  # how long one stream would run alone: all 8 are still running at the stop


def _stream_tokens(system: BootedSystem) -> int:
    """Tokens for one stream to run about STREAM_S alone on this machine and this model,
    measured in the test itself: eight of them drain well inside the 60 s grace, and the last
    one started is still running when the unit stops."""
    closing = _generate(system, "app", "--ignore-eos", "--max-tokens", "64")
    rate = float(re.search(r"(\d+) tok/s", closing).group(1))  # type: ignore[union-attr]
    return max(64, min(3000, int(rate * STREAM_S)))


def _stream(system: BootedSystem, prompt: str, tokens: int) -> subprocess.Popen[str]:
    # Past end-of-sequence: the trained model ends a raw prompt's answer in a few tokens.
    argv = [EDGEAGENT, "generate", prompt, "--max-tokens", str(tokens), "--temperature", "0",
            "--ignore-eos"]  # fmt: skip
    return subprocess.Popen(
        system.command(*argv, user="app"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_stop_under_eight_streams_drains_them_and_exits_0(installed: Installed) -> None:
    system = installed.system
    tokens = _stream_tokens(system)
    streams = [_stream(system, f"Stream {i}", tokens) for i in range(8)]
    for stream in streams:  # every stream admitted and generating before the stop
        assert stream.stdout is not None
        assert stream.stdout.read(1), stream.communicate()
    stopping = time.monotonic()
    system.systemctl("stop", UNIT)
    stop_s = time.monotonic() - stopping
    results = [stream.communicate(timeout=HANG_S) for stream in streams]
    codes = [stream.returncode for stream in streams]
    journal = system.journal()
    system.systemctl("start", UNIT)
    assert codes == [0] * 8, results
    assert all(f"{tokens} generated" in err for _, err in results), results
    assert system.show("Result") == "success"
    assert "SIGKILL" not in journal.split("Stopping")[-1]
    # Not asserted: in a whole run of this module the journal lacked the drain line while
    # every stream was in flight at the stop and finished (it is there when this test runs
    # alone); noted in issue 25's closing note, not yet understood.
    drained = re.findall(r"draining (\d+) request\(s\) for up to", journal)
    print(f"\nstop under 8 streams of {tokens} tokens: {stop_s:.1f} s, drain lines {drained}")


def test_the_journal_carries_priorities(installed: Installed) -> None:
    system = installed.system
    wait_for("serving", lambda: system.show("StatusText").startswith("serving"))
    warnings = system.journal("-p", "warning")
    everything = system.journal()
    assert "engine died" in warnings  # logged at error by the earlier test
    assert "serving" in everything
    info_only = [line for line in everything.splitlines() if "effective configuration" in line]
    assert info_only
    assert not any(line in warnings for line in info_only)


def test_start_to_ready_under_systemd_and_bare(
    installed: Installed, tmp_path: Path, tiny_model: Path
) -> None:
    """Both warm (the store holds the model, vLLM's compile cache is filled): the unit
    restarted, and the bare daemon's second start on the same state."""
    system = installed.system
    system.systemctl("restart", UNIT)
    under_systemd = _ready_after(system)
    bare_s = 0.0
    for served in (tiny_model, None):
        started = time.monotonic()
        bare = start_daemon(tmp_path, 10.0, served)
        bare_s = time.monotonic() - started
        assert bare.terminate(HANG_S) == 0
    assert under_systemd is not None
    print(f"\nstart -> READY, warm: under systemd {under_systemd:.1f} s, bare {bare_s:.1f} s")


# -- Mender's update module, standalone (issue 31): the last tests before uninstalling, since
# they leave the quality gate on and a probation ------------------------------------------------

PROBATION_S = 15.0
MENDER_CONFIG = CONFIG.replace("probation_s = 0", f"probation_s = {PROBATION_S:g}").replace(
    "quality_gate = false", "quality_gate = true"
)
FAILPOINT_DROP_IN = f"/etc/systemd/system/{UNIT}.d/failpoint.conf"


@pytest.fixture(scope="module")
def mender_box(installed: Installed) -> BootedSystem:
    """The unit with the gate and a probation, whose running daemon SIGKILLs itself at its
    first update's load (`update.loading`); the one systemd restarts after that does not."""
    system = installed.system
    assert system.path(MODULE).is_file(), (
        "install.sh did not install Mender's update module: is mender-client installed on "
        "the host (.ci/run installs it)?\n" + installed.install.stdout
    )
    set_up_mender(system)
    system.write("/etc/edgeagent/edgeagent.toml", MENDER_CONFIG)
    system.write(FAILPOINT_DROP_IN, "[Service]\nEnvironment=EDGEAGENT_FAILPOINT=update.loading\n")
    system.systemctl("daemon-reload")
    system.systemctl("restart", UNIT)
    wait_for("serving", lambda: system.show("StatusText").startswith("serving"))
    system.run("rm", FAILPOINT_DROP_IN)
    system.systemctl("daemon-reload")
    return system


def _served_model(system: BootedSystem) -> Path:
    return system.path(f"/var/lib/edgeagent/models/versions/{system.served_version()}/model")


def _client_lines(done: subprocess.CompletedProcess[str]) -> str:
    """What the Mender client printed, without its routine log lines."""
    lines = (done.stdout + done.stderr).splitlines()
    return "\n".join(
        line
        for line in lines
        if "level=info" not in line
        and "level=warning" not in line
        and not line.startswith(("0%", "|", "."))
    )


def test_mender_a_daemon_killed_during_artifact_install_comes_back_consistent(
    mender_box: BootedSystem, tmp_path: Path
) -> None:
    """`mender install`: the daemon dies loading the artifact's version (the failpoint);
    systemd restarts it on the version it served, which the store still names current; Mender
    rolls back (the module waits for the daemon) and still names the factory artifact."""
    system = mender_box
    before, restarts = system.served_version(), int(system.show("NRestarts"))
    model = with_release_notes(_served_model(system), tmp_path / "killed", "killed in install\n")
    since = now(system)
    install = mender(system, "install", write_artifact(system, model, "model-killed"))
    logged = module_journal(system, since)
    print(f"\nmender install, daemon killed:\n{_client_lines(install)}\nthe module:\n{logged}")
    assert install.returncode == 1, install.stdout + install.stderr
    assert "Rolling back Artifact..." in install.stdout
    assert int(system.show("NRestarts")) == restarts + 1
    assert system.served_version() == before
    assert json.loads(system.cli("models", "show", "current").stdout)["version"] == before
    assert installed_artifact(system) == FACTORY_ARTIFACT
    assert mender(system, "commit").returncode == 2  # nothing left in progress
    assert "ArtifactInstall failed" in logged
    assert f"serving {before}" in logged.split("ArtifactRollback")[-1]


def test_mender_a_good_artifact_is_installed_then_committed_after_probation(
    mender_box: BootedSystem, tmp_path: Path
) -> None:
    """`mender install` hot-swaps while apps generate; `mender commit` returns once the
    probation is over; no app request fails."""
    system = mender_box
    before = system.served_version()
    model = with_release_notes(_served_model(system), tmp_path / "good", "a good release\n")
    artifact = write_artifact(system, model, "model-good")
    since = now(system)
    with Apps(system) as apps:
        install = mender(system, "install", artifact)
        after_install = system.served_version()
        commit = mender(system, "commit")
    status = system.cli("status").stdout
    logged = module_journal(system, since)
    print(f"\nmender install:\n{_client_lines(install)}\nmender commit:\n"
          f"{_client_lines(commit)}\nthe module:\n{logged}"
          f"apps: {apps.completed} requests")  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    assert "Use 'commit' to update" in install.stdout
    assert after_install not in {"", before}
    assert commit.returncode == 0, commit.stdout + commit.stderr
    assert "probation" not in status  # held until it was over
    assert f"{after_install} serves, its probation over" in logged
    assert system.served_version() == after_install
    assert installed_artifact(system) == "model-good"
    assert apps.failures == []
    assert apps.completed > 0


def test_mender_a_candidate_the_gate_refuses_fails_and_the_old_version_serves(
    mender_box: BootedSystem, tmp_path: Path
) -> None:
    system = mender_box
    before = system.served_version()
    model = with_shuffled_head(_served_model(system), tmp_path / "refused")
    artifact = write_artifact(system, model, "model-refused")
    since = now(system)
    with Apps(system) as apps:
        install = mender(system, "install", artifact)
    status = system.cli("status").stdout
    logged = module_journal(system, since)
    print(f"\nmender install, refused by the gate:\n{_client_lines(install)}\nthe module:\n"
          f"{logged}apps: {apps.completed} requests")  # fmt: skip
    assert install.returncode == 1, install.stdout + install.stderr
    assert "Rolling back Artifact..." in install.stdout
    assert system.served_version() == before
    assert installed_artifact(system) == "model-good"
    assert re.search(r"^bad\s+\S+: quality gate refused", status, re.MULTILINE), status
    assert "ArtifactInstall failed: " in logged
    assert "quality gate refused" in logged
    assert apps.failures == []
    assert apps.completed > 0


def test_uninstall_leaves_only_what_was_asked_to_keep(installed: Installed) -> None:
    system = installed.system
    system.run("bash", f"{REPO_INSIDE}/deploy/uninstall.sh")
    assert system.systemctl("is-active", UNIT, check=False).stdout.strip() == "inactive"
    assert not system.path(f"/etc/systemd/system/{UNIT}").exists()
    assert not system.path("/usr/local/bin/edgeagent").exists()
    assert not system.path(MODULE).exists()
    assert system.path("/var/lib/edgeagent/models").is_dir()  # kept
    assert system.path("/etc/edgeagent/edgeagent.toml").is_file()  # kept
    system.run("bash", f"{REPO_INSIDE}/deploy/uninstall.sh", "--purge")
    for gone in ("/var/lib/edgeagent", "/var/cache/edgeagent", "/etc/edgeagent"):
        assert not system.path(gone).exists(), gone
    assert "edgeagent:" not in system.path("/etc/passwd").read_text()
    assert not system.run("pgrep", "-u", "edgeagent", check=False).stdout
