"""``python -m bench.gpu``: the timings of ``bench/gpu_check.sh``.

Without ``--section`` every section runs in this process and the report is
written to ``--out-dir`` (``bench/results`` by default). ``--section NAME
--parts DIR`` runs one section and writes ``DIR/NAME.json`` (how the shell
script gives each step its own time limit); ``--section report --parts DIR``
then assembles ``gpu_check.json`` and ``.md`` from the parts.

``--cpu-smoke`` runs everything at a tiny scale on the CPU in seconds (to
check the script); otherwise a CUDA device must be visible, and the command
refuses in one line when none is.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.gpu.report import (
    SECTIONS,
    TESTS_COMMAND,
    assemble,
    read_part,
    read_tests,
    write_report,
)
from bench.gpu.scales import GPU, SMOKE, CheckScale
from bench.harness import RESULTS_DIR, now, one_line_error, write_json

NO_CUDA = (
    "bench.gpu: no CUDA device is visible (torch.cuda.is_available() is False); "
    "run it on a GPU machine, or pass --cpu-smoke"
)


def build_parser() -> argparse.ArgumentParser:
    """The command's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="every timing at a tiny scale on the CPU (seconds)",
    )
    parser.add_argument(
        "--section",
        choices=(*SECTIONS, "report"),
        help="run one section into --parts (or assemble the report from them)",
    )
    parser.add_argument("--parts", type=Path, help="folder of the steps' part files")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where gpu_check.json and .md go (default bench/results)",
    )
    return parser


def _runner(name: str, scale: CheckScale) -> Callable[[Any], dict[str, Any]]:
    """The function that measures section ``name`` on a device."""
    if name == "replay":
        from bench.gpu.replay import section_replay

        return lambda dev: section_replay(scale.replay, dev)
    if name == "eval":
        from bench.gpu.evaluation import section_eval

        return lambda dev: section_eval(scale.eval, dev)
    from bench.gpu.lora import section_lora

    return lambda dev: section_lora(scale.lora, dev)


def run_section(name: str, scale: CheckScale, device: Any) -> dict[str, Any]:
    """Section ``name`` measured on ``device``, with its wall seconds.

    An exception becomes ``{"status": "error: ..."}`` (one line), so the
    other sections still run and the report says what failed.
    """
    t0 = now()
    try:
        part = _runner(name, scale)(device)
    except Exception as exc:  # noqa: BLE001 - recorded in the report, run goes on
        return {"status": f"error: {one_line_error(exc)}", "section_s": now() - t0}
    return {**part, "section_s": now() - t0}


def main(argv: list[str] | None = None) -> int:
    """Run the check (or one step of it); 0 when every section produced figures."""
    args = build_parser().parse_args(argv)
    if args.section is not None and args.parts is None:
        print("bench.gpu: --section needs --parts DIR", file=sys.stderr)
        return 2
    scale = SMOKE if args.cpu_smoke else GPU
    mode = scale.name
    if args.section == "report":
        parts: Path = args.parts
        sections = {name: read_part(parts, name) for name in SECTIONS}
        results = assemble(mode, dataclasses.asdict(scale), sections, read_tests(parts))
        path = write_report(results, args.out_dir)
        print(f"wrote {path} and {path.with_suffix('.md')}")
        return 0 if all("runs" in results[n] for n in SECTIONS) else 1

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    names = SECTIONS if args.section is None else (args.section,)
    done: dict[str, dict[str, Any]] = {}
    for name in names:
        done[name] = run_section(name, scale, device)
        print(
            f"bench.gpu: {name}: {done[name].get('status', 'done')} "
            f"({done[name]['section_s']:.1f} s)",
            flush=True,
        )
        if args.section is not None:
            write_json(args.parts / f"{name}.json", done[name])
    if args.section is None:
        tests = {
            "command": TESTS_COMMAND,
            "status": "not run (bench/gpu_check.sh runs them)",
        }
        results = assemble(mode, dataclasses.asdict(scale), done, tests)
        path = write_report(results, args.out_dir)
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0 if all("runs" in part for part in done.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
