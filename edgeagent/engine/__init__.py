"""The floor that runs the model: the engine interface and vLLM behind it, the loader that
brings a stored version up (fit check, load, smoke test), and the serving slot, the one owner of
what is served.

- `interface.py`: what the rest of edgeagent needs of an engine (no vLLM import)
- `vllm_engine.py`: vLLM's `AsyncLLM` behind that interface; `worker.py`: methods vLLM mixes
  into its workers; `cpu_kernels.py`: the CPU build's missing 4-bit GEMM (a vLLM plugin)
- `loader.py`: a stored version → a smoke-tested engine, sized by the fit check
- `placement.py`: where a version's engine goes (beside, reload in place, restart) and the one
  "does not fit" refusal; `bounds.py`: how long each step may wait on an engine
- `slot.py`: the engine serving now, its version, and the requests using it
"""
