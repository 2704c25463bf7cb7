"""edgeagent: serve a 4-bit Phi-4 from vLLM to local apps over gRPC on an edge box."""

__version__ = "0.1.0"
