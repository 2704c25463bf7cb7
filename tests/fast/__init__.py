"""The fast tier: the real daemon, store, updater, journal and gRPC servers, with fake engines
and a fake GPU (`fakes.py`). Nothing here imports vLLM or torch; `make test-fast` runs it."""
