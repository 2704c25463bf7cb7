"""The compile cache beside a version (store/compile_cache.py, compile_key.py, warm_start.py),
with fake engines that "compile" into the folder the daemon points Inductor at: a file there
when they start means they loaded it, none means they compiled (and wrote one).

The key says why a cache is not this box's, field by field; a cache is used only when every file
is the size and sha256 its cache.json lists, and anything else about it is logged and ignored
without failing a start, an import or a fetch."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hub_server import HubServer
from waits import until

from edgeagent.engine.interface import EngineConfig
from edgeagent.errors import CorruptArtifactError
from edgeagent.sources.fetch import HubFetcher, HubTarget
from edgeagent.store import compile_cache
from edgeagent.store.compile_cache import CACHE_FOLDER, CACHE_MANIFEST, FILES
from edgeagent.store.compile_key import BoxFacts, CompileKey, cpu_device, engine_key, probe_box
from edgeagent.store.manifest import ImportSource, Manifest
from edgeagent.store.store import ModelStore
from edgeagent.store.trust import TrustPolicy
from fast.fakes import FakeEngine, FakeEngines, make_fake_model
from fast.runner import Box, InProcess, in_process

CPU_BOX = BoxFacts(device="cpu x86_64 AVX512 +avx512_vnni", driver="none", python="3.11",
                   torch="2.13.0+cpu", vllm="0.32.0", triton="unused")  # fmt: skip
GRAPH = "fxgraph/ab/graph-of-the-model"


@dataclass
class CompilingEngines(FakeEngines):
    """Fake engines that find their graph in Inductor's folder or "compile" it there."""

    loaded: list[bool] = field(default_factory=list)

    def __call__(self, config: EngineConfig) -> FakeEngine:
        graph = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / GRAPH
        self.loaded.append(graph.is_file())
        if not graph.is_file():
            graph.parent.mkdir(parents=True, exist_ok=True)
            graph.write_text(f"compiled for {config.max_num_seqs} sequences")
            (graph.parent.parent / "locks").mkdir(exist_ok=True)
            (graph.parent.parent / "locks" / "graph.lock").write_text("")  # never exported
        return super().__call__(config)


def serving(
    box: Box, engines: CompilingEngines, **settings: str
) -> contextlib.AbstractAsyncContextManager[InProcess]:
    return in_process(box, None, engines=engines, machine=lambda: CPU_BOX, **settings)


def stored(box: Box, name: str = "a") -> list[Path]:
    return list(compile_cache.stored_caches(box.store.versions / box.versions[name].version))


async def test_a_served_version_stores_its_cache_and_a_fresh_box_starts_warm(
    box: Box, caplog: pytest.LogCaptureFixture
) -> None:
    """1. The first start compiles; once the engine serves, its key's folder is stored beside
       the version (lock files left out).
    2. The box's cache directory is wiped (a fresh host with the version and its cache).
    3. The next start imports the cache before the engine starts: the engine loads it."""
    caplog.set_level(logging.INFO)
    engines = CompilingEngines()
    version = box.versions["a"].version
    async with serving(box, engines):
        bundles = await until("the cache stored", lambda: stored(box))
    manifest = compile_cache.read_manifest(bundles[0])
    assert [f.path for f in manifest.files] == [f"inductor/{GRAPH}"]
    assert manifest.made_from == version
    assert manifest.key["device"] == CPU_BOX.device
    assert engines.loaded == [False]

    shutil.rmtree(box.root / "cache")
    async with serving(box, engines):
        pass
    assert engines.loaded == [False, True]
    assert f"compile cache for {version}: imported (key {bundles[0].name}" in caplog.text
    assert f"compile cache for {version}: the engine compiled nothing new" in caplog.text


async def test_a_cache_of_another_key_is_not_used_and_the_log_says_which_field(
    box: Box, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    engines = CompilingEngines()
    async with serving(box, engines):
        await until("the cache stored", lambda: stored(box))
    shutil.rmtree(box.root / "cache")
    async with serving(box, engines, EDGEAGENT_MODEL__MAX_NUM_SEQS="4"):
        await until("the second key stored", lambda: len(stored(box)) == 2)
    assert engines.loaded == [False, False]
    assert ("not used: engine.max_num_seqs differs (artifact: 16, this box: 4); the engine "
            "compiles") in caplog.text  # fmt: skip


async def test_a_corrupt_stored_cache_is_removed_and_the_engine_compiles(
    box: Box, caplog: pytest.LogCaptureFixture
) -> None:
    engines = CompilingEngines()
    async with serving(box, engines):
        [bundle] = await until("the cache stored", lambda: stored(box))
    shutil.rmtree(box.root / "cache")
    (bundle / FILES / "inductor" / GRAPH).write_text("compiled for 99 sequences")  # same size
    async with serving(box, engines):
        await until("a good cache stored again", lambda: stored(box))  # removed, then made anew
    assert engines.loaded == [False, False]
    assert f"inductor/{GRAPH}: sha256" in caplog.text
    compile_cache.verify(bundle, compile_cache.read_manifest(bundle))


# -- the key ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "env", "device"),
    [
        ("fma avx2 avx512f avx512vl avx512bw avx512dq avx512_vnni", {}, "AVX512 +avx512_vnni"),
        ("fma avx2 avx512f", {}, "AVX2"),  # ATen's AVX512 needs VL, BW and DQ
        ("fma avx2 avx512vl avx512bw avx512dq amx_tile amx_bf16", {"ATEN_CPU_CAPABILITY": "avx2"},
         "AVX2 +amx_bf16 +amx_tile"),
        ("sse4_2", {}, "DEFAULT"),
    ],
)  # fmt: skip
def test_the_cpu_is_keyed_as_aten_picks_its_kernels(
    tmp_path: Path, flags: str, env: dict[str, str], device: str
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_device(cpuinfo, env) == f"cpu {os.uname().machine} {device}"


def _manifest(tmp_path: Path, **quantization: object) -> Manifest:
    model = make_fake_model(tmp_path / f"m{len(quantization)}")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"].update(quantization)
    (model / "config.json").write_text(json.dumps(config))
    store = ModelStore(tmp_path / "store")
    return store.import_directory(model, ImportSource(origin=str(model)))


def test_the_key_covers_the_graphs_not_the_tuning_nor_the_kv_cache_size(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    tuned = _manifest(tmp_path, iters=200, autoround_version="0.16")  # how, not what
    config = {"max_model_len": 1024, "max_num_seqs": 8, "kv_cache_bytes": 1 << 30}
    key = engine_key(CPU_BOX, manifest, config, Path("/a/served-model"))
    assert engine_key(CPU_BOX, tuned, config, Path("/b/served-model")) == key  # CPU: no path
    bigger = engine_key(CPU_BOX, manifest, {**config, "kv_cache_bytes": 2 << 30}, Path("/a"))
    assert bigger == key
    longer = engine_key(CPU_BOX, manifest, {**config, "max_model_len": 2048}, Path("/a"))
    assert longer.differences(key) == [
        "engine.max_model_len differs (artifact: 1024, this box: 2048)"
    ]
    gpu = BoxFacts("NVIDIA H100 (sm_90)", "570.1", "3.11", "2.9.0", "0.26.0", "3.4.0")
    on_gpu = engine_key(gpu, manifest, config, Path("/var/cache/edgeagent/served-model"))
    assert on_gpu.as_dict["served_path"] == "/var/cache/edgeagent/served-model"  # vLLM's hash
    assert "device differs (artifact: cpu x86_64 AVX512 +avx512_vnni, this box: NVIDIA H100 " \
           "(sm_90))" in on_gpu.differences(key)  # fmt: skip


# -- the stored format ----------------------------------------------------------------------


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A cache built from a box's key folder, in a scratch folder."""
    source = tmp_path / "box"
    (source / "inductor" / "ab").mkdir(parents=True)
    (source / "inductor" / "ab" / "kernel.so").write_bytes(b"\x7fELF" + bytes(60))
    (source / "vllm" / "modelinfos").mkdir(parents=True)
    (source / "vllm" / "modelinfos" / "phi3.json").write_text("{}")
    key = CompileKey.of({"device": "cpu", "vllm": "0.32.0"})
    built = compile_cache.build_bundle(source, key, "v1", tmp_path / "scratch")
    assert built is not None
    return built[0]


def _refusal(bundle: Path) -> str:
    with pytest.raises(CorruptArtifactError) as refused:
        compile_cache.verify(bundle, compile_cache.read_manifest(bundle))
    return str(refused.value)


def test_a_cache_is_checked_file_by_file(bundle: Path) -> None:
    compile_cache.verify(bundle, compile_cache.read_manifest(bundle))
    (bundle / FILES / "vllm" / "stray.py").write_text("import os")
    assert _refusal(bundle) == f"vllm/stray.py is not listed in {CACHE_MANIFEST}"
    (bundle / FILES / "vllm" / "stray.py").unlink()
    (bundle / FILES / "inductor" / "ab" / "kernel.so").write_bytes(b"\x7fELF")
    assert _refusal(bundle) == "inductor/ab/kernel.so: 4 bytes, listed 64"


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"keyid": "0" * 16}, "its key hashes to"),
        ({"key": {"device": "gpu", "vllm": "0.32.0"}}, "its key hashes to"),
        ({"files": [{"path": "../../etc/x", "sha256": "0" * 64, "size": 1}]}, "refused entry"),
        ({"format": 2}, "not a compile cache manifest"),
    ],
)
def test_a_cache_json_that_does_not_hold_is_refused(
    bundle: Path, change: dict[str, object], says: str
) -> None:
    document = json.loads((bundle / CACHE_MANIFEST).read_text())
    (bundle / CACHE_MANIFEST).write_text(json.dumps({**document, **change}))
    with pytest.raises(CorruptArtifactError, match=says):
        compile_cache.read_manifest(bundle)


# -- from sources: a directory (models import, drops) and the hub -----------------------------


def _published(tmp_path: Path, bundle: Path) -> Path:
    model = make_fake_model(tmp_path / "published")
    shutil.copytree(bundle, model / CACHE_FOLDER / bundle.name)
    return model


@pytest.mark.parametrize("problem", ["none", "corrupt", "link"])
def test_an_imported_directory_brings_its_cache_when_it_checks_out(
    tmp_path: Path, bundle: Path, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`models import` and a drop: the cache is kept beside the version, never as its files;
    a cache that does not check out is left out, and the version is imported all the same."""
    model = _published(tmp_path, bundle)
    files = model / CACHE_FOLDER / bundle.name / FILES
    if problem == "corrupt":
        (files / "vllm" / "modelinfos" / "phi3.json").write_text("[]")
    if problem == "link":
        (files / "vllm" / "x").symlink_to("/etc/passwd")
    store = ModelStore(tmp_path / "store")
    manifest = store.import_directory(model, ImportSource(origin="drop"), follow_links=False)
    assert all(not e.path.startswith(CACHE_FOLDER) for e in manifest.files)
    caches = list(compile_cache.stored_caches(store.versions / manifest.version))
    if problem == "none":
        assert [c.name for c in caches] == [bundle.name]
    else:
        assert caches == []
        assert f"compile cache {bundle.name} from {model}: not taken" in caplog.text


def test_no_cache_is_taken_from_a_source_where_signatures_are_required(
    tmp_path: Path, bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A compile cache is code no model signature covers: where signatures are required, a box
    uses only the caches it made itself."""
    model = _published(tmp_path, bundle)
    store = ModelStore(tmp_path / "store")
    version = store.import_directory(model, ImportSource(origin="drop")).version
    shutil.rmtree(store.versions / version / CACHE_FOLDER)
    store.trust = TrustPolicy(required=True)
    assert compile_cache.take_compile_caches(store, model / CACHE_FOLDER, version, "drop") == []
    assert "signatures are required" in caplog.text


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo("edge/tiny")
        yield server


def test_a_hub_fetch_brings_the_caches_made_on_a_box_like_this_one(
    tmp_path: Path, hub: HubServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A repo with two caches: one made on this box's device and software, fetched and stored;
    one made on a GPU, whose files are never downloaded (only its cache.json)."""
    caplog.set_level(logging.INFO)
    source = tmp_path / "box"
    (source / "inductor").mkdir(parents=True)
    (source / "inductor" / "graph.so").write_bytes(b"compiled")
    here = CompileKey.of({**_box_fields(probe_box()), "engine.max_num_seqs": "16"})
    gpu = CompileKey.of({**_box_fields(probe_box()), "device": "NVIDIA H100 (sm_90)"})
    model = make_fake_model(tmp_path / "published")
    for key in (here, gpu):
        built = compile_cache.build_bundle(source, key, "v1", tmp_path / f"s-{key.keyid}")
        assert built is not None
        shutil.copytree(built[0], model / CACHE_FOLDER / key.keyid)
    hub.repos["edge/tiny"].commit(model)
    store = ModelStore(tmp_path / "store")
    manifest = HubFetcher(store, endpoint=hub.endpoint).fetch(HubTarget("edge/tiny"))
    caches = [c.name for c in compile_cache.stored_caches(store.versions / manifest.version)]
    assert caches == [here.keyid]
    downloaded = [p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p]
    assert any(p.endswith(f"{here.keyid}/{FILES}/inductor/graph.so") for p in downloaded)
    assert not any(gpu.keyid in p and p.endswith(".so") for p in downloaded)
    assert f"compile cache {gpu.keyid}: not fetched: device differs" in caplog.text
    assert all(not e.path.startswith(CACHE_FOLDER) for e in manifest.files)


def _box_fields(box: BoxFacts) -> dict[str, str]:
    return {name: getattr(box, name) for name in ("device", "driver", "python", "torch",
                                                  "vllm", "triton")}  # fmt: skip
