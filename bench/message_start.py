"""What one message costs a deployed client before it trains: process start.

In deployment a SuperNode starts a fresh ClientApp process for every message,
so each message pays for the interpreter, the imports and the model load.
This bench measures, in fresh processes (median of N):

- ``import client.app`` (what Flower does to find the handlers; kept light:
  no transformers/PEFT at import);
- the same plus loading the model a handler needs (tiny-llama built from a
  config; SmolLM2-135M from the converted safetensors cache, memory-mapped);
- the same plus attaching LoRA (what a LoRA message needs before training).

Run: ``python -m bench.message_start [--repeats 5]``; writes
``bench/results/message_start.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from bench.harness import REPO, machine_info, markdown_table, write_results

COLUMNS = ("per-message start (fresh process)", "median s", "min s")

CASES = {
    "import client.app": "import client.app",
    "+ load tiny-llama": (
        "import client.app\nfrom models import load_causal_lm\nload_causal_lm('tiny-llama')"
    ),
    "+ load smollm2-135m (cached)": (
        "import client.app\nfrom models import load_causal_lm\nload_causal_lm('smollm2-135m')"
    ),
    "+ load smollm2-135m + attach LoRA": (
        "import client.app\nfrom models import load_causal_lm, attach_lora\n"
        "from protocols import LoraSpec\n"
        "m = load_causal_lm('smollm2-135m')\nattach_lora(m.model, LoraSpec(model='smollm2-135m'))"
    ),
}


def _time(code: str) -> float:
    """Wall seconds of ``python -c code`` in a fresh process, from the repository."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        check=True,
        capture_output=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    return time.perf_counter() - t0


def main() -> int:
    """Measure each case ``--repeats`` times; write JSON and a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from models import prepare_model

    prepare_model("smollm2-135m")  # the one-time conversion is not a per-message cost
    rows = {}
    for name, code in CASES.items():
        times = [_time(code) for _ in range(args.repeats)]
        rows[name] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "runs": times,
        }
    result = {
        "machine": machine_info(("flwr",)),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cases": rows,
    }
    table_rows = [
        dict(
            zip(COLUMNS, (k, f"{v['median_s']:.2f}", f"{v['min_s']:.2f}"), strict=True)
        )
        for k, v in rows.items()
    ]
    table = "\n".join(markdown_table(table_rows, COLUMNS, align="lrr", compact=True))
    table += "\n"
    write_results("message_start", result, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
