"""Where the benchmarks' inputs and outputs are."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root (benchmarks run from here)."""

RESULTS_DIR = REPO / "bench" / "results"
"""Where every benchmark writes ``<stem>.json`` and ``<stem>.md``."""

SHARED_DATA = REPO.parent / "shared" / "data"
"""The shared datasets beside the checkout (read only, offline)."""
