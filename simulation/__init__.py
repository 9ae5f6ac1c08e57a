"""Many virtual clients on one machine: preparation, engine, reports, plots.

The top layer: it imports ``server`` and ``client`` and nothing imports it.
"""

from simulation.launcher import LaunchResult, launch
from simulation.partitioning import PartitionError, describe, partition
from simulation.plots import plot_comparison, plot_run
from simulation.prepare import new_run_dir, prepare_run
from simulation.reports import (
    ReportError,
    compare_table,
    read_metrics,
    run_summary,
    summary_table,
)

__all__ = [
    "LaunchResult",
    "PartitionError",
    "ReportError",
    "compare_table",
    "describe",
    "launch",
    "new_run_dir",
    "partition",
    "plot_comparison",
    "plot_run",
    "prepare_run",
    "read_metrics",
    "run_summary",
    "summary_table",
]
