"""Every error edgeagent raises on purpose.

Statuses (gRPC codes, HTTP statuses) are assigned in `server/error_codes.py`; `exit_code` is what
the CLI returns for each, so scripts can tell a missing repo from a full disk (the table is in
the README).
"""

from __future__ import annotations

from typing import ClassVar


class EdgeAgentError(Exception):
    """Base class: an error edgeagent understands and can explain."""

    exit_code: ClassVar[int] = 1


class ConfigError(EdgeAgentError, ValueError):
    """The configuration cannot work (a missing model directory, an impossible size)."""

    exit_code = 2


class NotFoundError(EdgeAgentError, LookupError):
    """A model version, hub repo, revision or file does not exist."""

    exit_code = 4


class CorruptArtifactError(EdgeAgentError):
    """An artifact's bytes do not match its digests, or it is not a loadable model."""

    exit_code = 5


class SignatureError(CorruptArtifactError):
    """A version is not admitted by `trust` (store/trust.py): unsigned, signed by a key not in
    trust.public_keys, or its files are not the ones its signature names; the message says
    which. Handled wherever a corrupt version is (refused, fallen back from, never served)."""


class NoServableVersionError(EdgeAgentError):
    """Neither current nor previous can be loaded: corrupt, missing, or too big for the device."""

    exit_code = 10


class UpdateRefusedError(EdgeAgentError):
    """An update was not applied (corrupt, another layout, marked bad); the old version serves."""

    exit_code = 11


class InsufficientDiskError(EdgeAgentError, OSError):
    """Not enough free disk for a fetch or build; nothing was changed."""

    exit_code = 6


class AccessDeniedError(EdgeAgentError):
    """The hub refused: a gated or private repo without a (valid) token."""

    exit_code = 7


class HubUnreachableError(EdgeAgentError):
    """The hub cannot be reached, or offline mode has nothing stored for the request."""

    exit_code = 8


class BuildError(EdgeAgentError):
    """The quantizer failed; its last output lines are in the message."""

    exit_code = 9


class StoppedError(EdgeAgentError):
    """A fetch, build or start-up was stopped by a signal; staging is kept or cleaned, the
    store unchanged."""

    exit_code = 130


class InvalidRequestError(EdgeAgentError, ValueError):
    """A request breaks a rule; `field` names the part of the request at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ResourceExhaustedError(EdgeAgentError):
    """Too much is waiting, or the request is bigger than allowed; `retry_after_s` says when
    trying again may work (None: not as it is)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(EdgeAgentError):
    """The service cannot take work now (starting, draining, shutting down); retry later."""


class UnauthenticatedError(EdgeAgentError):
    """A TCP caller presented no bearer token, or the wrong one."""


class RequestCancelledError(EdgeAgentError):
    """The server cancelled a request in flight; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ClientTooSlowError(EdgeAgentError):
    """A streaming client stopped reading; its request was cancelled to free the engine."""


class EngineError(EdgeAgentError):
    """The engine failed while serving a request."""


class EngineDeadError(EngineError):
    """The engine is no longer running; nothing more can be served until it is restarted."""


class LoadError(EngineError):
    """A version could not be brought up: it does not fit, its engine failed to start or to
    reload it, or it failed its smoke test."""


class EngineUnresponsiveError(LoadError):
    """An engine step of an update ran past its bound, or the engine died during it: the engine
    no longer answers and is to be stopped (engine/bounds.py)."""
