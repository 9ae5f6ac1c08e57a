"""Tests for server.config (the run schema) and the ``pollinate validate`` CLI.

A run is configured once at the edge; mistakes must surface there, all at
once and by field name, not rounds later. These tests check the defaults,
the TOML round trip, override precedence, error reporting (every bad field
named in one message), the cross-field check, and the validate command's
exit codes, console messages and override flags.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import build_parser, main
from cli.overrides import collect_overrides
from protocols import LoraSpec
from server.config import ConfigError, RunConfig, config_to_toml, load_config
from server.methods import build_spec


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps at the terminal width; keep long paths on one line."""
    monkeypatch.setenv("COLUMNS", "400")


def _write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_valid() -> None:
    """The defaults must validate on their own and give a valid LoRA spec
    (``model.max_length`` is "auto" until the run is prepared: given here)."""
    config = load_config()
    assert config == RunConfig()
    assert config.federation.min_clients <= config.federation.clients
    assert config.model.max_length == "auto" and config.data.eval_examples is None
    sized = load_config(None, {"model.max_length": 96})
    spec = build_spec(sized)
    assert isinstance(spec, LoraSpec)
    assert spec.rank == config.lora.rank and spec.max_length == 96


def test_toml_round_trip(tmp_path: Path) -> None:
    """config_to_toml written to a file and read back must give an equal config,
    for defaults and for a config with every section changed."""
    custom = load_config(
        None,
        {
            "run.name": 'my "quoted" run',
            "data.source": 'C:\\data\\my "quoted" file.jsonl',
            "run.rounds": 3,
            "run.output_dir": str(tmp_path / "out"),
            "model.name": "tiny-llama",
            "model.dtype": "bfloat16",
            "data.limit": 200,
            "data.partitioning": "iid",
            "data.alpha": 1e-5,
            "federation.clients": 6,
            "federation.fraction": 0.5,
            "federation.min_clients": 2,
            "train.learning_rate": 3e-4,
            "lora.target_modules": ["q_proj", "k_proj", "v_proj"],
            "lora.dropout": 0.1,
            "eval.metric": "rouge_l",
            "eval.device": "cpu",
        },
    )
    for config in (RunConfig(), custom):
        path = _write(tmp_path, config_to_toml(config))
        assert load_config(path) == config


def test_toml_round_trip_control_characters(tmp_path: Path) -> None:
    """config_to_toml promises a file load_config reads back equal: a string
    holding a newline, tab or other control character must be escaped
    (TOML basic strings forbid raw newlines), not written raw."""
    config = load_config(None, {"model.name": "line one\nline two\tend\x01"})
    path = _write(tmp_path, config_to_toml(config))
    assert load_config(path) == config


def test_overrides_win_over_file(tmp_path: Path) -> None:
    """Dotted overrides must beat the file; untouched file values must stay."""
    path = _write(tmp_path, "[federation]\nclients = 8\n\n[train]\nlocal_steps = 2\n")
    config = load_config(path, {"federation.clients": 3, "lora.alpha": 32})
    assert config.federation.clients == 3
    assert config.train.local_steps == 2
    assert config.lora.alpha == 32.0


def test_every_bad_field_named_at_once(tmp_path: Path) -> None:
    """One ConfigError must name every invalid field together (users fix all at
    once): a bad count, a negative rate, a wrongly typed rank and an unknown key."""
    path = _write(
        tmp_path,
        "[federation]\nclients = 0\n\n[train]\nlearning_rate = -1\nlr = 0.1\n\n"
        '[lora]\nrank = "x"\n',
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    for field in ("federation.clients", "train.learning_rate", "lora.rank", "train.lr"):
        assert field in msg, field
    assert str(path) in msg
    assert "4 invalid" in msg


def test_same_errors_through_overrides() -> None:
    """Overrides are validated the same way as file values."""
    with pytest.raises(ConfigError) as err:
        load_config(None, {"federation.clients": 0, "lora.rank": "x", "train.lr": 1})
    msg = str(err.value)
    assert "federation.clients" in msg and "lora.rank" in msg and "train.lr" in msg


def test_min_clients_cross_check() -> None:
    """min_clients above clients can never be satisfied and must be refused
    naming both fields."""
    with pytest.raises(ConfigError) as err:
        load_config(None, {"federation.clients": 2, "federation.min_clients": 5})
    assert "federation.min_clients" in str(err.value)
    assert "federation.clients" in str(err.value)
    assert load_config(None, {"federation.clients": 5, "federation.min_clients": 5})


def test_min_replies_cross_check() -> None:
    """min_replies above the clients a round samples fails every round, after
    a wasted one: it must be refused at parse time, naming the fields; equal
    is fine."""
    with pytest.raises(ConfigError, match=r"federation\.min_replies \(3\)"):
        load_config(None, {"federation.clients": 2, "federation.min_replies": 3})
    with pytest.raises(ConfigError, match="federation.fraction"):
        load_config(
            None,
            {
                "federation.clients": 10,
                "federation.fraction": 0.3,
                "federation.min_replies": 4,
            },
        )
    assert load_config(
        None,
        {
            "federation.clients": 10,
            "federation.fraction": 0.3,
            "federation.min_replies": 3,
        },
    )


@pytest.mark.parametrize("clients", [1, 3, 7, 10, 100])
@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.55, 1.0])
@pytest.mark.parametrize("min_clients", [1, 5])
def test_sampled_per_round_is_what_sampling_draws(
    clients: int, fraction: float, min_clients: int
) -> None:
    """The config's count of clients per round (behind the min_replies check)
    must equal what strategies.sampling.sample_nodes draws; the two formulas
    live apart, so this pins them together."""
    from server.config import FederationSection, sampled_per_round
    from strategies.sampling import sample_nodes

    if min_clients > clients:
        return
    fed = FederationSection(clients=clients, fraction=fraction, min_clients=min_clients)
    drawn = sample_nodes(
        {i: f"n{i:04d}" for i in range(clients)},
        fraction=fraction,
        min_nodes=min_clients,
        seed=0,
        server_round=1,
    )
    assert sampled_per_round(fed) == len(drawn)


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "../../x",
        "/abs",
        "a/b",
        "a\\b",
        "",
        "   ",
        ".",
        "..",
        "a\x00b",
        "a\nb",
        "x" * 201,
    ],
)
def test_run_names_that_leave_the_output_folder_are_refused(name: str) -> None:
    """run.name becomes the run folder <output_dir>/<name>-<time>: a name that
    climbs out, is absolute, empty, holds a separator, NUL or a control
    character, or is too long for a file name is refused naming run.name."""
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, {"run.name": name})


@pytest.mark.parametrize("name", ["pollinate", "my run v2.1", "exp-α_β", "..x", "a.."])
def test_ordinary_run_names_are_accepted(name: str) -> None:
    """Spaces, dots inside a name and non-ASCII letters stay allowed."""
    assert load_config(None, {"run.name": name}).run.name == name


@pytest.mark.parametrize("key", ["clients", "federation", "a.b.c", ".x", "federation."])
def test_bad_override_key(key: str) -> None:
    """Override keys must be section.field."""
    with pytest.raises(ConfigError, match="section.field"):
        load_config(None, {key: 1})


def test_unknown_section_named() -> None:
    """An unknown table is an error naming it."""
    with pytest.raises(ConfigError, match="trian"):
        load_config(None, {"trian.local_steps": 2})


def test_missing_file(tmp_path: Path) -> None:
    """A missing config file is a ConfigError naming the path."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="absent.toml"):
        load_config(path)


def test_bad_toml(tmp_path: Path) -> None:
    """Unparsable TOML is a ConfigError naming the file, not a raw TOMLDecodeError."""
    path = _write(tmp_path, "[run\nname = 'x'\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_config_is_frozen() -> None:
    """A parsed config cannot be changed behind the run's back."""
    config = load_config()
    with pytest.raises(Exception):  # pydantic's ValidationError for frozen models
        config.federation.clients = 9  # type: ignore[misc]


# -- CLI --------------------------------------------------------------------------


def test_validate_valid_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pollinate validate` exits 0 on a valid file and says it is valid."""
    path = _write(
        tmp_path, '[federation]\nclients = 3\n\n[model]\nname = "tiny-llama"\n'
    )
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert "valid" in err and "3 clients" in err and "invalid" not in err


def test_validate_invalid_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pollinate validate` exits 2 on a bad file and names every bad field."""
    path = _write(tmp_path, "[federation]\nclients = 0\n\n[lora]\ndropout = 1.5\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "invalid" in err
    assert "federation.clients" in err and "lora.dropout" in err


def test_validate_flags_applied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A named flag that makes a valid file invalid is reported by field."""
    path = _write(tmp_path, "")
    assert main(["validate", str(path), "--clients", "0"]) == 2
    assert "federation.clients" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", "lora.rank=0"]) == 2
    assert "lora.rank" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", "no-equals-sign"]) == 2
    assert "no-equals-sign" in capsys.readouterr().err


def test_validate_missing_data_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A data.source file that does not exist is reported by name with exit 2."""
    missing = tmp_path / "nowhere" / "train-data.jsonl"
    path = _write(tmp_path, f'[data]\nsource = "{missing}"\n')
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.source" in err and str(missing) in err


def test_collect_overrides_from_parser(tmp_path: Path) -> None:
    """--set values are parsed as TOML values, named flags map to their fields,
    and both win over the file."""
    path = _write(tmp_path, "[federation]\nclients = 8\n\n[lora]\nalpha = 4.0\n")
    args = build_parser().parse_args(
        [
            "validate",
            str(path),
            "--set",
            "lora.alpha=32",
            "--set",
            'lora.target_modules=["q_proj"]',
            "--set",
            "run.name=plain text",
            "--clients",
            "3",
            "--lr",
            "0.01",
        ]
    )
    overrides = collect_overrides(args)
    assert overrides == {
        "federation.clients": 3,
        "train.learning_rate": 0.01,
        "lora.alpha": 32,
        "lora.target_modules": ["q_proj"],
        "run.name": "plain text",
    }
    config = load_config(path, overrides)
    assert config.lora.alpha == 32.0
    assert config.federation.clients == 3
    assert config.lora.target_modules == ("q_proj",)
    assert config.run.name == "plain text"
    assert config.train.learning_rate == 0.01


# --- Robust aggregation, differential privacy and attack settings (issue 10) ---


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"federation.clip": "fixed"}, "needs federation.clip_norm"),
        (
            {"run.method": "fedkseed", "federation.clip": "fixed"},
            "needs zo.max_abs_grad",
        ),
        (
            {
                "privacy.mode": "central",
                "privacy.noise_multiplier": 0.0,
                "privacy.target_epsilon": 3.0,
            },
            "noise_multiplier is 0",
        ),
        ({"privacy.mode": "local", "privacy.delta": 0.25}, "privacy.delta (0.25)"),
        (
            {"privacy.mode": "central", "federation.aggregator": "median"},
            "needs federation.aggregator 'mean'",
        ),
        ({"run.method": "sfprompt", "privacy.mode": "central"}, "not 'sfprompt'"),
        ({"attack.clients": [4]}, "attack.clients [4]"),
        ({"federation.aggregator": "bulyan"}, "4 x byzantine + 3"),
        (
            {"federation.aggregator": "multi_krum", "federation.krum_keep": 5},
            "krum_keep",
        ),
        ({"federation.trim_fraction": 0.5}, "federation.trim_fraction"),
        ({"federation.aggregator": "average"}, "federation.aggregator"),
    ],
)
def test_robust_and_privacy_settings_that_make_no_sense_are_refused(
    overrides: dict[str, object], named: str
) -> None:
    """Each bad combination is one ConfigError naming what is wrong."""
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert named in str(err.value)
    assert "\n" not in str(err.value)


def test_sensible_privacy_and_robust_settings_are_accepted() -> None:
    """The same fields, set consistently, validate; delta defaults to 1/(10 N)."""
    config = load_config(
        None,
        {
            "federation.clients": 8,
            "federation.aggregator": "bulyan",
            "federation.byzantine": 1,
            "privacy.mode": "off",
        },
    )
    assert config.federation.aggregator == "bulyan"
    private = load_config(
        None,
        {"run.method": "fedkseed", "privacy.mode": "central", "zo.max_abs_grad": 50.0},
    )
    assert private.privacy.resolved_delta(private.federation.clients) == pytest.approx(
        1 / 40
    )
    assert load_config(None, {"attack.behaviour": "scale", "attack.fraction": 0.25})


# --- Central DP with client-side clipping, and under SecAgg+ ---

SECURE_CENTRAL = {
    "privacy.secagg": True,
    "privacy.mode": "central",
    "privacy.clipping": "client",
    "federation.weighting": "equal",
}


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (
            {"privacy.secagg": True, "privacy.mode": "central"},
            "needs privacy.clipping 'client'",
        ),
        ({"privacy.mode": "local", "privacy.clipping": "client"}, "not 'local'"),
        ({"privacy.clipping": "client"}, "not 'off'"),
        (
            {**SECURE_CENTRAL, "federation.weighting": "examples"},
            "needs federation.weighting 'equal'",
        ),
        (
            {**SECURE_CENTRAL, "privacy.clip_norm": 9.0},
            "privacy.clip_norm (9) must be <= privacy.secagg_clip (8)",
        ),
        (
            {**SECURE_CENTRAL, "run.method": "fedkseed", "privacy.clip_norm": 9.0},
            "privacy.clip_norm (9) must be <= privacy.secagg_clip (8)",
        ),
        ({"privacy.clipping": "both"}, "privacy.clipping"),
    ],
)
def test_client_side_clipping_settings_that_make_no_sense_are_refused(
    overrides: dict[str, object], named: str
) -> None:
    """Central DP under SecAgg+ needs client-side clipping, equal weights and
    a clip within SecAgg+'s; client-side clipping needs central DP."""
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert named in str(err.value)
    assert "\n" not in str(err.value)


def test_client_side_clipping_is_accepted_with_and_without_secagg() -> None:
    """Client-side clipping validates with central DP alone and under SecAgg+
    (LoRA; FedKSeed without zo.max_abs_grad, the clients' clip bounding each
    per-seed sum); server-side clipping stays the default."""
    assert load_config().privacy.clipping == "server"
    plain = load_config(None, {"privacy.mode": "central", "privacy.clipping": "client"})
    assert plain.privacy.clipping == "client" and not plain.privacy.secagg
    lora = load_config(None, {**SECURE_CENTRAL, "privacy.clip_norm": 8.0})
    assert lora.privacy.secagg and lora.privacy.mode == "central"
    zo = load_config(None, {**SECURE_CENTRAL, "run.method": "fedkseed"})
    assert zo.zo.max_abs_grad is None and zo.privacy.clipping == "client"
