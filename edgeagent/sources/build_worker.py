"""The AutoRound run, in its own process: `python -m edgeagent.sources.build_worker JOB PPID`.

A separate process because AutoRound may call `sys.exit`, holds the whole base model in memory
and is stopped cleanly only by a signal. It reads a job file written by `build.py`, writes the
GPTQ export into the job's output directory, and reports on stdout one JSON object per line:
`{"event": "block", "done": 3, "total": 40}` as blocks finish, `{"event": "saved"}` at the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from edgeagent.children import die_with_parent

BLOCK_DONE = re.compile(r"quantized \d+/\d+ layers in the block")


def main(job_path: str, parent_pid: int) -> int:
    die_with_parent(parent_pid)
    job: dict[str, Any] = json.loads(Path(job_path).read_text())
    os.environ["AR_WORK_SPACE"] = job["work_dir"]  # else AutoRound writes ./ar_work_space
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = job["recipe"]
    torch.manual_seed(recipe["seed"])
    device = recipe["device"]
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    tokenizer = AutoTokenizer.from_pretrained(job["base"])
    model = AutoModelForCausalLM.from_pretrained(
        job["base"], dtype="auto" if on_gpu else torch.float32
    )
    samples = calibration_samples(tokenizer, job["calibration_text"], recipe)
    _report_blocks(model.config.num_hidden_layers)
    quantizer = AutoRound(
        model,
        tokenizer,
        bits=recipe["bits"],
        group_size=recipe["group_size"],
        sym=recipe["sym"],
        iters=recipe["iters"],
        nsamples=len(samples),
        seqlen=recipe["seqlen"],
        batch_size=min(recipe["batch_size"], len(samples)),
        dataset=samples,
        seed=recipe["seed"],
        device_map=0 if on_gpu else "cpu",
        enable_torch_compile=False,  # compiling costs more than it saves on small runs and CPUs
    )
    quantizer.quantize_and_save(job["out_dir"], format="auto_gptq")
    _emit({"event": "saved"})
    return 0


def calibration_samples(tokenizer: Any, text: str, recipe: dict[str, Any]) -> list[str]:
    """Cut the calibration text into `nsamples` windows of at least `seqlen` tokens.

    AutoRound skips samples shorter than seqlen, so each window is a few tokens longer than
    that to survive decode and re-encode; windows are spread evenly over the text.
    """
    seqlen, wanted = recipe["seqlen"], recipe["nsamples"]
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    window = seqlen + 16
    available = len(ids) // window
    if available == 0:
        _emit({"event": "error", "message": f"calibration text has {len(ids)} tokens; "
               f"one sample needs {window} (seqlen {seqlen})"})  # fmt: skip
        raise SystemExit(3)
    count = min(wanted, available)
    if count < wanted:
        _emit({"event": "warning", "message": f"calibration text gives {count} samples of "
               f"{seqlen} tokens, not {wanted}"})  # fmt: skip
    stride = available // count
    starts = [i * stride * window for i in range(count)]
    return [tokenizer.decode(ids[s : s + window]) for s in starts]


def _report_blocks(total: int) -> None:
    class BlockCounter(logging.Handler):
        done = 0

        def emit(self, record: logging.LogRecord) -> None:
            if BLOCK_DONE.search(record.getMessage()):
                self.done += 1
                _emit({"event": "block", "done": self.done, "total": total})

    logging.getLogger("autoround").addHandler(BlockCounter())


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
