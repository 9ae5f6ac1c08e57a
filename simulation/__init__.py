"""Many virtual clients on one machine: preparation, engine, reports, plots.

The top layer: it imports ``server`` and ``client`` and nothing imports it.

Importing this package is cheap: each public name is imported from its module
(the engine, Flower, matplotlib) on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocols.lazy import lazy_exports

if TYPE_CHECKING:
    from simulation.attacks import (
        AttackError,
        build_attack_app,
        client_app_ref,
        malicious_partitions,
    )
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
    "AttackError",
    "LaunchResult",
    "PartitionError",
    "ReportError",
    "build_attack_app",
    "client_app_ref",
    "compare_table",
    "describe",
    "launch",
    "malicious_partitions",
    "new_run_dir",
    "partition",
    "plot_comparison",
    "plot_run",
    "prepare_run",
    "read_metrics",
    "run_summary",
    "summary_table",
]

_LAZY = {
    "AttackError": "simulation.attacks",
    "build_attack_app": "simulation.attacks",
    "client_app_ref": "simulation.attacks",
    "malicious_partitions": "simulation.attacks",
    "LaunchResult": "simulation.launcher",
    "PartitionError": "simulation.partitioning",
    "ReportError": "simulation.reports",
    "compare_table": "simulation.reports",
    "describe": "simulation.partitioning",
    "launch": "simulation.launcher",
    "new_run_dir": "simulation.prepare",
    "partition": "simulation.partitioning",
    "plot_comparison": "simulation.plots",
    "plot_run": "simulation.plots",
    "prepare_run": "simulation.prepare",
    "read_metrics": "simulation.reports",
    "run_summary": "simulation.reports",
    "summary_table": "simulation.reports",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
