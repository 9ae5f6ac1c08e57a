"""A config that was not prepared still gives specs and evaluators a number.

``model.max_length = "auto"`` is fitted when the run is prepared; code that
builds a spec straight from a config (``pollinate export --edge run.toml``,
in-process runs handed the unprepared config) fits it from the same data by
the same rule (:func:`server.run_data.resolved_max_length`).
"""

from __future__ import annotations

from pathlib import Path

from protocols.run_folder import RunFolder
from server.config import load_config
from server.methods import build_spec
from simulation.prepare import prepare_run


def test_a_spec_built_from_an_unprepared_config_has_the_prepared_length(
    tmp_path: Path,
) -> None:
    """build_spec on an "auto" config gives the length prepare_run writes."""
    for method in ("lora", "fedkseed"):
        config = load_config(
            None,
            {
                "run.method": method,
                "model.name": "tiny-llama",
                "data.limit": 200,
                "run.output_dir": str(tmp_path),
            },
        )
        assert config.model.max_length == "auto"
        folder = RunFolder(prepare_run(config, tmp_path / method))
        prepared = load_config(folder.config).model.max_length
        assert isinstance(prepared, int)
        assert build_spec(config).max_length == prepared
