"""edgeagent's one configuration object.

Sources, highest priority first: keyword arguments; `EDGEAGENT_*` environment variables
(nested with `__`, e.g. `EDGEAGENT_SERVER__TCP_ADDRESS`); secret files in
`$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`, file name = field name, e.g. `hub_token`);
the TOML file (`$EDGEAGENT_CONFIG`, default `/etc/edgeagent/edgeagent.toml`); the defaults below.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from edgeagent.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("/etc/edgeagent/edgeagent.toml")
MiB = 1 << 20
GiB = 1 << 30


def config_file_path() -> Path:
    return Path(os.environ.get("EDGEAGENT_CONFIG", str(DEFAULT_CONFIG_FILE)))


def _default_dir(systemd_var: str, root_default: str, user_default: Path) -> Path:
    """systemd's StateDirectory= & co. when set, else the FHS path for root, else XDG for users."""
    if os.environ.get(systemd_var):
        return Path(os.environ[systemd_var].split(":")[0])
    return Path(root_default) if os.geteuid() == 0 else user_default


def _default_state_dir() -> Path:
    xdg = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return _default_dir("STATE_DIRECTORY", "/var/lib/edgeagent", xdg / "edgeagent")


def _default_cache_dir() -> Path:
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return _default_dir("CACHE_DIRECTORY", "/var/cache/edgeagent", xdg / "edgeagent")


def _default_runtime_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    user = Path(xdg) / "edgeagent" if xdg else Path(f"/tmp/edgeagent-{os.geteuid()}")
    return _default_dir("RUNTIME_DIRECTORY", "/run/edgeagent", user)


class ServerSettings(BaseModel):
    """Where and how the gRPC API listens."""

    socket_path: Path | None = Field(
        default=None, description="Unix socket for local apps; default RUNTIME_DIR/edgeagent.sock"
    )
    socket_mode: int = Field(default=0o660, ge=0, le=0o777)
    socket_group: str | None = Field(
        default=None, description="group of the app socket: the client apps' group"
    )
    admin_socket_path: Path | None = Field(
        default=None, description="admin API socket; default RUNTIME_DIR/admin.sock"
    )
    admin_socket_mode: int = Field(default=0o600, ge=0, le=0o777)
    tcp_address: str | None = Field(
        default=None, description="also listen on HOST:PORT; needs TLS or an api_token"
    )
    tls_cert_file: Path | None = Field(default=None, description="PEM chain for TCP")
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = Field(
        default=None, description="require client certificates signed by this CA (mTLS)"
    )
    http_socket_path: Path | None = Field(
        default=None, description="Unix socket of the OpenAI-compatible HTTP API (same mode "
        "and group as the gRPC one); default RUNTIME_DIR/openai.sock",
    )  # fmt: skip
    http_enabled: bool = Field(default=True, description="serve the OpenAI-compatible HTTP API")
    http_tcp_address: str | None = Field(
        default=None, description="also serve the HTTP API on HOST:PORT; TLS and api_token as "
        "for tcp_address",
    )  # fmt: skip
    max_message_bytes: int = Field(default=4 * MiB, ge=64 * 1024)
    drain_grace_s: float = Field(default=10.0, ge=0, description="in-flight time on shutdown")
    stream_write_timeout_s: float = Field(
        default=30.0, gt=0, description="a stream whose client reads nothing this long is "
        "cancelled (its engine slot freed)",
    )  # fmt: skip


class ModelSettings(BaseModel):
    """What is served and how the engine is sized."""

    source: Literal["hub", "embedded"] = Field(
        default="hub",
        description="what an empty store starts with: hub.repo at hub.revision, or the "
        "embedded tiny model built with AutoRound",
    )
    max_model_len: int | None = Field(default=None, ge=16, description="default: the model's")
    kv_cache_gib: float | None = Field(
        default=None, gt=0, description="default: derived by the fit check from free memory"
    )
    max_num_seqs: int = Field(default=16, ge=1)
    max_num_batched_tokens: int = Field(
        default=2048, ge=64, description="tokens in one engine step: prefill chunk size"
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    enforce_eager: bool = Field(default=False, description="debugging only: ~3.6x slower decode")
    quantized_kernel: Literal["auto", "marlin", "machete"] = Field(
        default="auto",
        description="4-bit GPTQ matmul kernel on Hopper: machete is vLLM's pick there; "
        "auto: the daemon's measured choice (marlin, docs/benchmarks.md, engine options), "
        "but machete where updates reload weights in place (marlin's reload hangs: issue 26)",
    )
    cpu_quantized_kernel: Literal["auto", "edgeagent"] = Field(
        default="auto",
        description="4-bit GPTQ on a CPU: auto: vLLM's kernel where its CPU build has one "
        "(AVX-512), else edgeagent's; edgeagent: always edgeagent's (the AVX2 path, anywhere)",
    )
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        default="auto", description="fp8: half the KV cache's bytes per token (2x the context)"
    )
    async_scheduling: bool | None = Field(
        default=None, description="schedule the next step while this one runs; None: vLLM's"
    )
    speculative: dict[str, Any] | None = Field(
        default=None,
        description='vLLM\'s speculative_config (e.g. {method = "ngram", '
        "num_speculative_tokens = 4}); off by default: judge it on a trained model",
    )
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        default="fcfs", description="priority: requests' priority field orders the queue"
    )
    structured_output_backend: Literal["auto", "xgrammar", "guidance"] = Field(
        default="auto", description="vLLM's; auto tries xgrammar, then guidance"
    )
    json_max_whitespace: int = Field(
        default=4, ge=0, description="whitespace characters in a row in constrained JSON "
        "(unbounded, a model can loop on spaces until max_tokens)",
    )  # fmt: skip
    health_check_s: float = Field(
        default=5.0, gt=0, description="how often the daemon asks the engine whether it is alive"
    )


class HubSettings(BaseModel):
    """Where models are fetched from. The token is `hub_token` (a credential or env var)."""

    repo: str = Field(default="kaitchup/Phi-4-AutoRound-GPTQ-4bit", pattern=r"^[^/@\s]+/[^/@\s]+$")
    revision: str = Field(default="main", min_length=1, description="branch, tag or commit")
    endpoint: str | None = Field(default=None, description="a mirror; default: HF_ENDPOINT")
    offline: bool = Field(default=False, description="never contact the hub; use the store")
    timeout_s: float = Field(default=10.0, gt=0, description="connect, and between two chunks")
    retries: int = Field(default=5, ge=1, description="attempts for busy answers and stalls")
    max_retry_wait_s: float = Field(
        default=60.0, gt=0, description="a longer Retry-After is not waited for"
    )


class MemorySettings(BaseModel):
    """How much of the device (GPU memory, or RAM for the CPU build) edgeagent may use."""

    budget_gib: float | None = Field(
        default=None,
        gt=0,
        description="at most this much, for every engine the daemon runs at once (a candidate "
        "started beside the serving engine included); default: all that is free",
    )
    reserve_gib: float = Field(default=0.5, ge=0, description="left free for other processes")


class StoreSettings(BaseModel):
    """The versioned model store under STATE_DIR/models."""

    keep_versions: int = Field(default=3, ge=1, description="gc keeps these plus current/previous")
    min_free_gib: float = Field(default=1.0, ge=0, description="left free after a fetch or build")
    verify_on_start: Literal["recorded", "full", "size"] = Field(
        default="recorded",
        description="recorded: files unchanged since last hashed (inode, size, mtime) are "
        "loaded at once and hashed after serving starts, the rest before; full: sha256 of "
        "every file before loading (~1 GB/s); size: sizes only",
    )
    compile_cache: bool = Field(
        default=True,
        description="export what vLLM, Inductor and Triton compiled for a version beside it "
        "in the store, and start warm from a stored compile cache whose key matches this box",
    )
    compile_cache_from_sources: bool = Field(
        default=True,
        description="take the compile cache a hub repo or a drop brings (compiled code, run "
        "by the engine; never taken where signatures are required)",
    )


class BuildSettings(BaseModel):
    """AutoRound's recipe. The defaults are the seed's: W4, group 128, symmetric, GPTQ format."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(default=128, ge=-1)
    sym: bool = Field(default=True, description="vLLM's CPU kernels need symmetric GPTQ")
    iters: int = Field(default=256, ge=0, description="0: round to nearest (RTN), seconds")
    nsamples: int = Field(default=128, ge=1)
    seqlen: int = Field(default=2048, ge=16)
    batch_size: int = Field(default=8, ge=1)
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(default=1, ge=1, description="OMP threads; 1 is fastest and repeatable")
    calibration: Path | None = Field(
        default=None, description=".txt or .jsonl; default: generated from Python's docs"
    )


SwapMode = Literal["auto", "beside", "in_place"]


class UpdateSettings(BaseModel):
    """Where updates come from besides `edgeagent update`, and how they are applied."""

    drop_dir: Path | None = Field(
        default=None, description="watched for model dirs with a READY file; default STATE_DIR/drop"
    )
    watch_drop_dir: bool = True
    hub_poll_interval_s: float = Field(
        default=3600.0, ge=0, description="ask the hub for a new commit of hub.revision; 0: never"
    )
    hub_poll_jitter: float = Field(default=0.1, ge=0, lt=1, description="± this share")
    hub_poll_max_backoff_s: float = Field(default=6 * 3600.0, gt=0)
    hold_s: float = Field(
        default=30.0, gt=0, description="how long requests under way may take to finish first"
    )
    probation_s: float = Field(
        default=300.0, ge=0, description="engine death this soon after an update rolls back"
    )
    swap: SwapMode = Field(
        default="auto",
        description="beside: start the candidate's engine while the old one serves, then "
        "switch without holding requests; in_place: hold requests, then reload the weights or "
        "restart the engine; auto: beside on a GPU where the fit check says both fit",
    )
    stage_in_host_memory: bool = Field(
        default=True,
        description="for an in-place update, stage the candidate and the serving weights in "
        "host memory (pinned on a GPU) in the kernels' layout before the pause, so the pause "
        "is one copy; needs twice the weights in available host memory beside "
        "`host_reserve_gib`, else the weights are reloaded from disk inside the pause",
    )
    host_reserve_gib: float = Field(
        default=2.0, ge=0, description="host memory staging leaves available to everything else"
    )
    quality_gate: bool = Field(
        default=True,
        description="score a candidate against the serving version before "
        "promoting it (perplexity and top-1 agreement on its eval set)",
    )
    eval_set: Path | None = Field(
        default=None, description="a JSONL of prompts or chat exchanges the quality gate "
        "scores a candidate on when it ships no eval.jsonl of its own (default: the held-out "
        "set for the embedded model, the project's general set for any other)",
    )  # fmt: skip
    max_perplexity_ratio: float = Field(
        default=1.2, gt=1, description="refused above this times the serving perplexity"
    )
    min_top1_agreement: float = Field(
        default=0.9, ge=0, le=1, description="refused below this share of positions"
    )
    step_timeout_s: float = Field(
        default=60.0, gt=0, description="the floor of the bound on each step an update awaits "
        "on an engine (a reload, the smoke test, the quality gate's scoring), to which each "
        "adds what its work needs (engine/bounds.py); an engine past its bound is stopped and "
        "the old version served on a fresh one",
    )  # fmt: skip
    start_timeout_s: float = Field(
        default=900.0, gt=0, description="the same floor for an engine start during an update "
        "(compilation included; plus the weights at 100 MiB/s)",
    )  # fmt: skip


class TrustSettings(BaseModel):
    """Which model versions are admitted: those signed with OpenSSF model signing (a `model.sig`
    beside the files) by one of these keys. Checked at every fetch and import and at start."""

    public_keys: list[Path] = Field(
        default_factory=list, description="PEM public keys (elliptic curve: P-256, P-384 or "
        "P-521) whose signatures are trusted",
    )  # fmt: skip
    require_signature: bool | None = Field(
        default=None, description="admit only versions signed by one of public_keys; "
        "default: on once any key is listed",
    )  # fmt: skip

    @model_validator(mode="after")
    def _keys_for_a_required_signature(self) -> TrustSettings:
        if self.require_signature and not self.public_keys:
            raise PydanticCustomError(
                "no_public_keys",
                "trust.require_signature is on but trust.public_keys lists no key, so no "
                "version could ever be admitted; list the publishers' public key files",
            )
        return self

    @property
    def required(self) -> bool:
        """Whether only signed versions are admitted (None: whenever keys are listed)."""
        if self.require_signature is None:
            return bool(self.public_keys)
        return self.require_signature


class MetricsSettings(BaseModel):
    """Prometheus metrics, off unless an address is set (loopback only)."""

    address: str | None = Field(
        default=None, description="serve /metrics on HOST:PORT, e.g. 127.0.0.1:9464"
    )


class LimitSettings(BaseModel):
    """Per-request limits, checked before a request reaches the engine."""

    max_input_bytes: int = Field(default=256 * 1024, ge=1, description="prompt or all messages")
    max_messages: int = Field(default=256, ge=1)
    max_stop_sequences: int = Field(default=8, ge=0)
    max_stop_sequence_bytes: int = Field(default=256, ge=1)
    default_max_tokens: int = Field(default=512, ge=1)
    max_prompt_tokens: int | None = Field(
        default=None, ge=1, description="per request; default: what the context allows"
    )
    max_waiting_requests: int = Field(
        default=64, ge=0, description="beyond the engine's batch (model.max_num_seqs); then "
        "RESOURCE_EXHAUSTED with a retry hint",
    )  # fmt: skip
    max_queued_prompt_tokens: int = Field(
        default=131072, ge=1, description="prompt tokens of all requests under way together"
    )
    max_constraint_bytes: int = Field(
        default=64 * 1024, ge=1, description="a JSON schema, regex, grammar or all choices"
    )
    max_choices: int = Field(default=256, ge=2)
    max_top_n_tokens: int = Field(
        default=5, ge=0, le=20, description="alternatives per token (vLLM's max_logprobs is 20)"
    )
    max_n: int = Field(default=8, ge=1, description="completions per request")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EDGEAGENT_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    state_dir: Path = Field(default_factory=_default_state_dir)
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    runtime_dir: Path = Field(default_factory=_default_runtime_dir)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    hub_token: SecretStr | None = None
    api_token: SecretStr | None = Field(default=None, description="bearer token for TCP callers")
    admin_token: SecretStr | None = Field(
        default=None, description="bearer token for the admin API over TCP (else not served)"
    )
    server: ServerSettings = ServerSettings()
    model: ModelSettings = ModelSettings()
    hub: HubSettings = HubSettings()
    memory: MemorySettings = MemorySettings()
    store: StoreSettings = StoreSettings()
    build: BuildSettings = BuildSettings()
    updates: UpdateSettings = UpdateSettings()
    limits: LimitSettings = LimitSettings()
    metrics: MetricsSettings = MetricsSettings()
    trust: TrustSettings = TrustSettings()

    @field_validator("hub_token", "api_token", "admin_token", mode="before")
    @classmethod
    def _empty_secret_is_unset(cls, value: Any) -> Any:
        """An empty credential file (the install script's placeholder) means "not set"."""
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    @property
    def socket_path(self) -> Path:
        return self.server.socket_path or self.runtime_dir / "edgeagent.sock"

    @property
    def admin_socket_path(self) -> Path:
        return self.server.admin_socket_path or self.runtime_dir / "admin.sock"

    @property
    def http_socket_path(self) -> Path:
        return self.server.http_socket_path or self.runtime_dir / "openai.sock"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def hub_token_value(self) -> str | None:
        """The hub token in clear, for huggingface_hub calls only (never log it)."""
        return self.hub_token.get_secret_value() if self.hub_token else None

    @property
    def api_token_value(self) -> str | None:
        """The TCP callers' bearer token in clear, to compare with (never log it)."""
        return self.api_token.get_secret_value() if self.api_token else None

    @property
    def admin_token_value(self) -> str | None:
        return self.admin_token.get_secret_value() if self.admin_token else None

    @property
    def drop_dir(self) -> Path:
        return self.updates.drop_dir or self.state_dir / "drop"

    @property
    def polls_hub(self) -> bool:
        """Hub polling applies to a hub-sourced model when online and an interval is set."""
        return (
            self.model.source == "hub"
            and not self.hub.offline
            and self.updates.hub_poll_interval_s > 0
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if credentials and Path(credentials).is_dir():
            if not os.access(credentials, os.R_OK | os.X_OK):
                raise ConfigError(
                    f"cannot read the credentials directory {credentials} "
                    "($CREDENTIALS_DIRECTORY): run as the user it was made for"
                )
            sources.append(SecretsSettingsSource(settings_cls, credentials, env_prefix=""))
        config_file = config_file_path()
        if config_file.is_file():
            try:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
            except tomllib.TOMLDecodeError as error:
                raise ConfigError(
                    f"bad configuration: {config_file} is not valid TOML ({error})"
                ) from None
        return tuple(sources)

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets masked (SecretStr dumps as ***)."""
        data: dict[str, Any] = json.loads(self.model_dump_json())
        data["server"]["socket_path"] = str(self.socket_path)
        data["server"]["admin_socket_path"] = str(self.admin_socket_path)
        data["server"]["http_socket_path"] = str(self.http_socket_path)
        return data
