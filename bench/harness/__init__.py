"""The shared benchmark harness: what every benchmark measures with and writes to.

One import for the benchmarks (``from bench.harness import ...``), eleven
small modules behind it:

- :mod:`~bench.harness.paths`: :data:`REPO`, :data:`RESULTS_DIR`,
  :data:`SHARED_DATA`;
- :mod:`~bench.harness.measure`: wall and CPU clocks, peak and current
  resident memory, :func:`best_time`, :func:`generation_throughput` of the
  seed generator and :func:`bytes_by_record` of a message's content;
- :mod:`~bench.harness.examples`: :func:`full_length_examples`, real rows
  of an exact token length for timed batches (:func:`exact_length_rows`
  with any tokenizing function, for a torch-free child);
- :mod:`~bench.harness.machine`: :func:`machine_info`, what the numbers
  were measured on;
- :mod:`~bench.harness.results`: :func:`write_json` / :func:`read_json`,
  :func:`write_results` (``<stem>.json`` plus ``<stem>.md``),
  :func:`merge_records`, :func:`markdown_table` (a table from row dicts) and
  :func:`report_row` (a row of the :data:`REPORT_COLUMNS` table);
- :mod:`~bench.harness.processes`: :func:`module_command`,
  :func:`run_json_child`, :func:`last_json_line` and :func:`run_logged` (a
  process with a log file and a deadline);
- :mod:`~bench.harness.run_folders`: :func:`newest_run_dir` and
  :func:`read_run`, on top of :class:`protocols.run_folder.RunFolder`, and
  :func:`simulate_args` and :func:`run_and_read` (a ``pollinate simulate``
  command line; a logged simulation and its run folder);
- :mod:`~bench.harness.inprocess`: :class:`RunScale` (the size of a mode's
  federations), :func:`serve_in_process` and :func:`run_in_process` (one
  federation on an in-process grid, in this process; timed, its error and
  run folder read) and :func:`one_line_error`;
- :mod:`~bench.harness.run_list`: a benchmark of many runs saved one by one
  (:func:`resume_runs`, :func:`run_pending`, :func:`finish_runs`,
  :func:`utc_stamp`);
- :mod:`~bench.harness.plots`: :func:`save_figure` (``<stem>.png`` beside a
  report);
- :mod:`~bench.harness.cli`: the command line of a sectioned benchmark
  (:func:`benchmark_parser`, :func:`add_render_option`,
  :func:`add_resume_options`, :func:`chosen_names`, :func:`chosen_sections`, :func:`run_mode`, :func:`result_stem`,
  :func:`stamped_log`, :func:`finish_run`, :func:`render_saved`,
  :func:`quiet_environment`).

Only the standard library is imported at module level. Benchmarks that
measure peak memory spawn their children from a lean parent (on Linux a
child's ``ru_maxrss`` starts at its parent's resident size at fork/exec), so
torch, numpy, flwr and ``protocols`` are imported inside the functions that
need them.
"""

from bench.harness.cli import (
    add_render_option,
    add_resume_options,
    benchmark_parser,
    chosen_names,
    chosen_sections,
    finish_run,
    quiet_environment,
    render_saved,
    result_stem,
    run_mode,
    stamped_log,
)
from bench.harness.examples import exact_length_rows, full_length_examples
from bench.harness.inprocess import (
    RunScale,
    one_line_error,
    run_in_process,
    serve_in_process,
)
from bench.harness.machine import (
    DEFAULT_PACKAGES,
    SHARED_NOTE,
    cpu_model,
    git_commit,
    machine_info,
)
from bench.harness.measure import (
    best_time,
    bytes_by_record,
    cpu,
    generation_throughput,
    maxrss_mib,
    now,
    rss_mib,
)
from bench.harness.paths import REPO, RESULTS_DIR, SHARED_DATA
from bench.harness.plots import save_figure
from bench.harness.processes import (
    last_json_line,
    module_command,
    run_json_child,
    run_logged,
)
from bench.harness.results import (
    REPORT_COLUMNS,
    markdown_table,
    merge_records,
    read_json,
    report_row,
    write_json,
    write_results,
)
from bench.harness.run_folders import (
    newest_run_dir,
    read_run,
    run_and_read,
    simulate_args,
)
from bench.harness.run_list import (
    finish_runs,
    resume_runs,
    run_pending,
    utc_stamp,
)

__all__ = [
    "DEFAULT_PACKAGES",
    "REPO",
    "REPORT_COLUMNS",
    "RESULTS_DIR",
    "SHARED_DATA",
    "SHARED_NOTE",
    "RunScale",
    "add_render_option",
    "add_resume_options",
    "benchmark_parser",
    "best_time",
    "bytes_by_record",
    "chosen_names",
    "chosen_sections",
    "cpu",
    "cpu_model",
    "exact_length_rows",
    "finish_run",
    "finish_runs",
    "full_length_examples",
    "generation_throughput",
    "git_commit",
    "last_json_line",
    "machine_info",
    "markdown_table",
    "maxrss_mib",
    "merge_records",
    "module_command",
    "newest_run_dir",
    "now",
    "one_line_error",
    "quiet_environment",
    "read_json",
    "read_run",
    "render_saved",
    "report_row",
    "result_stem",
    "resume_runs",
    "rss_mib",
    "run_and_read",
    "run_in_process",
    "run_json_child",
    "run_logged",
    "run_mode",
    "run_pending",
    "save_figure",
    "serve_in_process",
    "simulate_args",
    "stamped_log",
    "utc_stamp",
    "write_json",
    "write_results",
]
