"""Every error edgeagent raises on purpose. gRPC status codes are assigned in `server/status.py`."""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Base class: an error edgeagent understands and can explain."""


class ConfigError(EdgeAgentError, ValueError):
    """The configuration cannot work (a missing model directory, an impossible size)."""


class InvalidRequestError(EdgeAgentError, ValueError):
    """A request breaks a rule; `field` names the part of the request at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnavailableError(EdgeAgentError):
    """The service cannot take work now (starting, draining, shutting down); retry later."""


class RequestCancelledError(EdgeAgentError):
    """The server cancelled a request in flight; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EngineError(EdgeAgentError):
    """The engine failed while serving a request."""


class EngineDeadError(EngineError):
    """The engine is no longer running; nothing more can be served until it is restarted."""
