"""The GPU check's results: machine, test outcome and figures, as JSON and markdown.

Sections arrive either in process (``python -m bench.gpu``) or as part files
written by separate steps of ``bench/gpu_check.sh`` (``<parts>/<section>.json``,
with ``<section>.rc`` holding the step's exit status and ``tests.log`` /
``tests.rc`` the output of the ``gpu``-marked tests). A section that is
missing is recorded with the reason, never left out, so a step that timed out
shows in the report.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.harness import (
    DEFAULT_PACKAGES,
    machine_info,
    markdown_table,
    read_json,
    write_results,
)

__all__ = [
    "SECTIONS",
    "STEM",
    "assemble",
    "gpu_info",
    "read_part",
    "read_tests",
    "render",
    "write_report",
]

STEM = "gpu_check"
SECTIONS = ("replay", "eval", "lora")
COLUMNS = ("section", "what", "device", "scale", "seconds", "rate", "target", "note")
TESTS_COMMAND = "python -m pytest -m gpu -q -p no:cacheprovider tests/"
_SUMMARY = re.compile(r"\d+ (passed|failed|skipped|error|errors|deselected)\b")


def _nvidia_driver() -> str | None:
    """The driver version ``nvidia-smi`` reports, or None without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def gpu_info() -> dict[str, Any]:
    """The GPU, CUDA and torch versions the figures were measured with."""
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            nvidia_driver=_nvidia_driver(),
        )
    return info


def read_part(parts: Path, section: str) -> dict[str, Any]:
    """The section a step wrote, or a ``status`` saying why there is none."""
    path = parts / f"{section}.json"
    if path.is_file():
        part: dict[str, Any] = read_json(path)
        return part
    rc_file = parts / f"{section}.rc"
    rc = rc_file.read_text().strip() if rc_file.is_file() else "?"
    why = "ran past its time limit" if rc in ("124", "137") else f"exited with {rc}"
    return {"status": f"missing: the {section} step {why} (see its log)"}


def read_tests(parts: Path) -> dict[str, Any]:
    """Exit status and summary line of the ``gpu``-marked tests' step."""
    log, rc_file = parts / "tests.log", parts / "tests.rc"
    if not rc_file.is_file():
        return {"command": TESTS_COMMAND, "status": "not run"}
    rc = int(rc_file.read_text().strip() or -1)
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    summary = next(
        (ln.strip("= ") for ln in reversed(lines) if _SUMMARY.search(ln)), ""
    )
    return {
        "command": TESTS_COMMAND,
        "rc": rc,
        "summary": summary,
        "passed": rc == 0 and "skipped" not in summary and "passed" in summary,
    }


def assemble(
    mode: str,
    scale: dict[str, Any],
    sections: dict[str, dict[str, Any]],
    tests: dict[str, Any],
) -> dict[str, Any]:
    """The whole results document."""
    machine = {
        **machine_info(
            DEFAULT_PACKAGES,
            note="device timings wait for the device "
            "(torch.cuda.synchronize) before the clock is read",
        ),
        **gpu_info(),
    }
    return {
        "benchmark": STEM,
        "mode": mode,
        "machine": machine,
        "scale": scale,
        "tests": tests,
        **{name: sections.get(name, {"status": "not run"}) for name in SECTIONS},
    }


def _num(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:,.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _row(section: str, run: dict[str, Any]) -> dict[str, str]:
    target = run.get("target_s")
    verdict = ""
    if target is not None:
        verdict = f"< {target:g} s: {'yes' if run.get('meets_target') else 'no'}"
    note = "extrapolated" if run.get("extrapolated") else "measured"
    if "seeds_replayed" in run:
        note += f" ({run['seeds_replayed']} seeds"
        if "tensors_replayed" in run:
            note += f" x {run['tensors_replayed']} tensors"
        note += f" in {run['measured_s']:.2f} s)"
    if "metric" in run:
        note += f"; loss {run['loss']:.3f}, {run['metric_name']} {run['metric']:.3f}"
    return {
        "section": section,
        "what": run["what"],
        "device": run["device"],
        "scale": run["scale"],
        "seconds": _num(run["seconds"]),
        "rate": f"{_num(run['rate'])} {run['rate_unit']}",
        "target": verdict,
        "note": note,
    }


def render(results: dict[str, Any]) -> str:
    """The markdown report of a results document."""
    m = results["machine"]
    tests = results["tests"]
    lines = [
        f"# GPU check ({results['mode']})",
        "",
        f"- GPU: {m.get('gpu')} ({m.get('gpu_memory_gib')} GiB), CUDA "
        f"{m.get('cuda_version')}, driver {m.get('nvidia_driver')}, torch "
        f"{m.get('torch')}",
        f"- CPU: {m.get('cpu_model')} ({m.get('cpu_affinity')} usable), "
        f"{m.get('memory_gib')} GiB; commit {m.get('git_commit', '')[:12]}; "
        f"{m.get('date')}",
        f"- `gpu`-marked tests (`{tests['command']}`): "
        + (
            f"rc {tests['rc']}, {tests['summary'] or 'no summary line'}"
            if "rc" in tests
            else tests.get("status", "")
        ),
        "",
    ]
    rows: list[dict[str, str]] = []
    for name in SECTIONS:
        part = results[name]
        if "runs" not in part:
            lines.append(f"- {name}: {part.get('status', 'no figures')}")
            continue
        rows += [_row(name, run) for run in part["runs"]]
    if rows:
        lines += markdown_table(rows, COLUMNS, align="llllrrll")
    targets = [
        f"- {name}: {results[name]['target']}"
        for name in SECTIONS
        if "target" in results[name]
    ]
    if targets:
        lines += ["", "Targets:", *targets]
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    """Write ``<out_dir>/gpu_check.json`` and ``.md``; return the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_results(STEM, results, render(results), out_dir=out_dir)
