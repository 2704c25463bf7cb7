"""Generated gRPC stubs for proto/edgeagent/v1 (made by the build; see setup.py)."""
