"""Bad configs and data files end in one line and exit status 2, never a traceback.

Each case below is one mistake a user makes (TOML syntax, a wrong type, an
unknown key, an out-of-range value, settings that contradict each other or
the data, a missing, unreadable, empty, binary, truncated or mis-shaped data
file, a bad override, a bad model path). Every case runs in-process through
``cli.main.main`` for ``pollinate validate`` and for ``pollinate simulate
--prepare-only``: both must refuse it before anything is written, with
exactly one line on stderr that starts ``pollinate <verb>: error:`` and names
the file, field or value. An internal error, by contrast, must keep its
traceback: hiding one would hide our bugs.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cli.main import main
from tests.conftest import run_python

GOOD_RECORDS = [
    {"prompt": f"question {i}", "response": f"answer {i}", "group": f"g{i % 3}"}
    for i in range(60)
]
GOOD_JSONL = "".join(json.dumps(r) + "\n" for r in GOOD_RECORDS).encode()
VERBS = (("validate",), ("simulate", "--prepare-only"))


@dataclass(frozen=True)
class Case:
    """One bad input.

    ``config`` is merged into the base config (a dict of tables) or replaces
    the whole file (str or bytes). ``data`` is the data file's content, under
    ``data_name``. ``setup`` prepares anything else under the test's folder.
    ``args`` and ``expect`` may hold ``{tmp}``, the test's folder.
    """

    id: str
    expect: tuple[str, ...]
    config: dict[str, dict[str, Any]] | str | bytes = field(default_factory=dict)
    data: bytes | None = GOOD_JSONL
    data_name: str = "data.jsonl"
    args: tuple[str, ...] = ()
    config_arg: str | None = None
    setup: Callable[[Path], None] | None = None


def _gz_truncated() -> bytes:
    whole = gzip.compress(GOOD_JSONL)
    return whole[: len(whole) // 2]


def _lines(*records: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _mkdir(name: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).mkdir()


def _write(name: str, content: bytes) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(content)

    return setup


def _source(path: str) -> dict[str, dict[str, Any]]:
    return {"data": {"source": path}}


GOOD = GOOD_RECORDS[0]
CASES = [
    # -- the config file itself -------------------------------------------------
    Case("toml-syntax", ("run.toml", "TOML"), config="[run\nname = 'x'\n"),
    Case(
        "toml-duplicate-key",
        ("run.toml", "TOML"),
        config="[run]\nrounds = 1\nrounds = 2\n",
    ),
    Case("toml-non-utf8", ("run.toml", "UTF-8"), config=b'[run]\nname = "\xff\xfe"\n'),
    Case("toml-binary", ("run.toml",), config=random.Random(0).randbytes(3000)),
    Case("config-missing", ("absent.toml",), config_arg="{tmp}/absent.toml"),
    Case(
        "config-is-dir",
        ("conf.toml",),
        config_arg="{tmp}/conf.toml",
        setup=_mkdir("conf.toml"),
    ),
    Case("table-is-scalar", ("run:", "got 5"), config="run = 5\n"),
    # -- wrong types, unknown keys, out-of-range values -------------------------
    Case("rounds-string", ("run.rounds", "'five'"), {"run": {"rounds": "five"}}),
    Case(
        "clients-float", ("federation.clients", "2.5"), {"federation": {"clients": 2.5}}
    ),
    Case(
        "targets-string",
        ("lora.target_modules",),
        {"lora": {"target_modules": "q_proj"}},
    ),
    Case("unknown-field", ("train.lr",), {"train": {"lr": 0.1}}),
    Case("unknown-table", ("trian",), {"trian": {"local_steps": 2}}),
    Case(
        "clients-zero", ("federation.clients", "got 0"), {"federation": {"clients": 0}}
    ),
    Case(
        "fraction-above-1",
        ("federation.fraction", "1.5"),
        {"federation": {"fraction": 1.5}},
    ),
    Case("dropout-1", ("lora.dropout",), {"lora": {"dropout": 1.0}}),
    Case("dtype-unknown", ("model.dtype", "float64"), {"model": {"dtype": "float64"}}),
    Case("method-unknown", ("run.method", "sgd"), {"run": {"method": "sgd"}}),
    Case(
        "partitioning-unknown",
        ("data.partitioning", "random"),
        {"data": {"partitioning": "random"}},
    ),
    Case("max-length-small", ("model.max_length",), {"model": {"max_length": 8}}),
    Case("seed-negative", ("run.seed",), {"run": {"seed": -1}}),
    # -- settings that contradict each other -------------------------------------
    Case(
        "min-clients-over-clients",
        ("federation.min_clients", "federation.clients"),
        {"federation": {"min_clients": 3}},
    ),
    Case(
        "min-replies-over-clients",
        ("federation.min_replies", "3"),
        {"federation": {"min_replies": 3}},
    ),
    Case(
        "min-replies-over-sampled",
        ("federation.min_replies", "federation.fraction"),
        {"federation": {"clients": 4, "fraction": 0.25, "min_replies": 2}},
    ),
    Case(
        "limit-not-above-eval",
        ("data.eval_examples", "data.limit"),
        {"data": {"limit": 10, "eval_examples": 10}},
    ),
    Case(
        "limit-leaves-too-few",
        ("data.min_partition_size", "data.limit"),
        {"data": {"limit": 20}},
    ),
    # -- settings that contradict the data ---------------------------------------
    Case(
        "eval-examples-vs-data",
        ("data.eval_examples", "60", "data.jsonl"),
        {"data": {"eval_examples": 60}},
    ),
    Case(
        "clients-vs-data", ("federation.clients", "60"), {"federation": {"clients": 60}}
    ),
    Case(
        "min-partition-vs-data",
        ("data.min_partition_size", "30"),
        {"data": {"min_partition_size": 30}},
    ),
    Case(
        "task-partition-vs-groups",
        ("data.partitioning", "federation.clients", "3 groups"),
        {"data": {"partitioning": "task"}, "federation": {"clients": 4}},
    ),
    # -- run names that leave the output folder ----------------------------------
    Case("name-parent", ("run.name", "../escape"), {"run": {"name": "../escape"}}),
    Case("name-absolute", ("run.name", "/tmp/abs"), {"run": {"name": "/tmp/abs"}}),
    Case("name-separator", ("run.name", "a/b"), {"run": {"name": "a/b"}}),
    Case("name-backslash", ("run.name",), {"run": {"name": "a\\b"}}),
    Case("name-nul", ("run.name", "\\x00"), {"run": {"name": "a\x00b"}}),
    Case("name-dotdot", ("run.name", "'..'"), {"run": {"name": ".."}}),
    Case("name-blank", ("run.name",), {"run": {"name": "   "}}),
    Case(
        "output-dir-is-file",
        ("run.output_dir", "afile"),
        {"run": {"output_dir": "{tmp}/afile"}},
        setup=_write("afile", b"x"),
    ),
    # -- data files -----------------------------------------------------------
    Case("data-missing", ("data.source", "nope.jsonl"), _source("{tmp}/nope.jsonl")),
    Case(
        "data-is-dir",
        ("data.source", "dir.jsonl"),
        _source("{tmp}/dir.jsonl"),
        setup=_mkdir("dir.jsonl"),
    ),
    Case("data-empty", ("data.jsonl", "empty"), data=b""),
    Case("data-blank-lines", ("data.jsonl", "empty"), data=b"\n  \n\n"),
    Case("data-binary", ("data.jsonl",), data=random.Random(1).randbytes(4000)),
    Case("data-nul-bytes", ("data.jsonl",), data=b"\x00" * 100),
    Case(
        "data-gz-truncated",
        ("data.jsonl.gz", "gzip"),
        _source("{tmp}/data.jsonl.gz"),
        data=_gz_truncated(),
        data_name="data.jsonl.gz",
    ),
    Case(
        "data-gz-corrupt",
        ("data.jsonl.gz", "gzip"),
        _source("{tmp}/data.jsonl.gz"),
        data=b"\x1f\x8b" + random.Random(2).randbytes(500),
        data_name="data.jsonl.gz",
    ),
    Case(
        "data-gz-empty",
        ("data.jsonl.gz", "empty"),
        _source("{tmp}/data.jsonl.gz"),
        data=gzip.compress(b""),
        data_name="data.jsonl.gz",
    ),
    Case(
        "data-non-utf8", ("data.jsonl", "UTF-8"), data=GOOD_JSONL[:200] + b"\xff\xfe\n"
    ),
    Case(
        "data-bad-json-line",
        ("data.jsonl", "line 3", "invalid JSON"),
        data=_lines(GOOD, GOOD) + b"{oops\n",
    ),
    Case(
        "data-wrong-schema", ("data.jsonl", "schema"), data=_lines({"foo": 1, "bar": 2})
    ),
    Case(
        "data-missing-field-later",
        ("line 5", "response"),
        data=_lines(*[GOOD] * 4, {"prompt": "p"}),
    ),
    Case(
        "data-wrong-field-type",
        ("line 2", "response"),
        data=_lines(GOOD, {"prompt": "p", "response": 7}),
    ),
    Case("data-record-not-object", ("line 1",), data=b"[1, 2, 3]\n"),
    Case(
        "json-object-without-list",
        ("data.json",),
        _source("{tmp}/data.json"),
        data=b'{"a": 1}',
        data_name="data.json",
    ),
    Case(
        "json-scalar",
        ("data.json",),
        _source("{tmp}/data.json"),
        data=b"42",
        data_name="data.json",
    ),
    Case(
        "json-truncated",
        ("data.json", "invalid JSON"),
        _source("{tmp}/data.json"),
        data=b'[{"prompt": "a"',
        data_name="data.json",
    ),
    Case(
        "csv-ragged",
        ("data.csv", "line 3"),
        _source("{tmp}/data.csv"),
        data=b"prompt,response\na,b\nc,d,e\n",
        data_name="data.csv",
    ),
    Case(
        "csv-header-only",
        ("data.csv", "empty"),
        _source("{tmp}/data.csv"),
        data=b"prompt,response\n",
        data_name="data.csv",
    ),
    Case(
        "data-unsupported-suffix",
        ("data.txt", ".jsonl"),
        _source("{tmp}/data.txt"),
        data=GOOD_JSONL,
        data_name="data.txt",
    ),
    Case("builtin-unknown", ("data.source", "builtin:nope"), _source("builtin:nope")),
    # -- command-line overrides ------------------------------------------------
    Case(
        "set-no-equals", ("--set", "no-equals-sign"), args=("--set", "no-equals-sign")
    ),
    Case("set-bare-key", ("clients", "section.field"), args=("--set", "clients=3")),
    Case("set-deep-key", ("a.b.c",), args=("--set", "a.b.c=1")),
    Case(
        "set-unknown-field", ("federation.nodes",), args=("--set", "federation.nodes=3")
    ),
    Case("set-empty-value", ("lora.rank",), args=("--set", "lora.rank=")),
    Case(
        "set-unclosed-list",
        ("lora.target_modules",),
        args=("--set", "lora.target_modules=["),
    ),
    Case("flag-bad-int", ("--clients", "abc"), args=("--clients", "abc")),
    Case("flag-unknown", ("--no-such-flag",), args=("--no-such-flag",)),
    # -- the model ---------------------------------------------------------------
    Case(
        "model-missing",
        ("model.name", "no/such/model"),
        {"model": {"name": "./no/such/model"}},
    ),
    Case(
        "model-empty-folder",
        ("model.name", "empty-model"),
        {"model": {"name": "{tmp}/empty-model"}},
        setup=_mkdir("empty-model"),
    ),
    Case(
        "model-garbage-config",
        ("model.name", "bad-model"),
        {"model": {"name": "{tmp}/bad-model"}},
        setup=_write("bad-model/config.json", b"{not json"),
    ),
    Case(
        "model-is-file",
        ("model.name", "weights.bin"),
        {"model": {"name": "{tmp}/weights.bin"}},
        setup=_write("weights.bin", b"\x00" * 64),
    ),
    Case(
        "lora-target-absent",
        ("nope_proj",),
        {"lora": {"target_modules": ["nope_proj"]}},
    ),
]


def _toml(tables: dict[str, dict[str, Any]]) -> str:
    out = []
    for table, values in tables.items():
        out.append(f"[{table}]")
        out.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    return "\n".join(out) + "\n"


def _fill(value: Any, tmp: Path) -> Any:
    return value.replace("{tmp}", str(tmp)) if isinstance(value, str) else value


def _prepare(case: Case, tmp: Path) -> str:
    """Write the case's files under ``tmp``; return the config path to pass."""
    base: dict[str, dict[str, Any]] = {
        "run": {"rounds": 1, "output_dir": str(tmp / "runs")},
        "model": {"name": "tiny-llama"},
        "data": {"source": str(tmp / "data.jsonl"), "eval_examples": 8},
        "federation": {"clients": 2},
    }
    if case.data is not None:
        (tmp / case.data_name).write_bytes(case.data)
    config_path = tmp / "run.toml"
    if isinstance(case.config, bytes):
        config_path.write_bytes(case.config)
    elif isinstance(case.config, str):
        config_path.write_text(case.config)
    else:
        for table, values in case.config.items():
            base.setdefault(table, {}).update(
                {k: _fill(v, tmp) for k, v in values.items()}
            )
        config_path.write_text(_toml(base))
    if case.setup is not None:
        case.setup(tmp)
    return _fill(case.config_arg, tmp) if case.config_arg else str(config_path)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v[0])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_and_exit_2(
    case: Case,
    verb: tuple[str, ...],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A user's mistake is refused with one line naming it, exit status 2.

    Breaks if a reader lets EOFError, zlib.error, UnicodeDecodeError or an
    OSError escape as a traceback, if validation accepts input that fails
    later (an empty or corrupt data file, settings that contradict each
    other or the data), if a message spreads over several lines or leaves
    out the file, field or value, or if ``simulate`` writes a run folder
    before refusing.
    """
    monkeypatch.setenv("COLUMNS", "80")  # a narrow terminal must not wrap the line
    tmp = tmp_path / "case"
    tmp.mkdir()
    config = _prepare(case, tmp)
    code, err = _run([*verb, config, *case.args], capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"pollinate {verb[0]}: error: "), err
    for text in case.expect:
        assert _fill(text, tmp) in lines[0], (text, err)
    made = list((tmp / "runs").glob("*")) + list(tmp.glob("escape*"))
    assert made == [], f"a refused run wrote {made}"


def test_a_valid_config_of_the_table_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The base config every case starts from is valid: each case fails for
    its own mistake, not for the base's.

    Breaks if the base config or the data checks reject good input.
    """
    config = _prepare(Case("good", ()), tmp_path)
    assert main(["validate", config]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("error", [RuntimeError, ValueError, KeyError])
def test_an_internal_error_keeps_its_traceback(
    error: type[Exception], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug (an exception that is not one of the user-facing error types)
    propagates out of ``main``, so Python prints its traceback.

    Breaks if the CLI catches too broadly (``except ValueError``,
    ``except Exception``) and turns our bugs into one-line "user errors".
    """
    import server.config

    def broken(*_: object, **__: object) -> None:
        raise error("internal bug")

    monkeypatch.setattr(server.config, "load_config", broken)
    config = _prepare(Case("good", ()), tmp_path)
    with pytest.raises(error, match="internal bug"):
        main(["validate", config])


def test_an_internal_error_prints_a_traceback(tmp_path: Path) -> None:
    """Run as a program, an internal error prints Python's traceback and exits 1.

    Breaks if ``main`` swallows unexpected exceptions.
    """
    config = _prepare(Case("good", ()), tmp_path)
    code = (
        "import sys, server.config\n"
        "def broken(*a, **k):\n"
        "    raise RuntimeError('internal bug')\n"
        "server.config.load_config = broken\n"
        "from cli.main import main\n"
        f"sys.exit(main(['validate', {config!r}]))\n"
    )
    out = run_python(code, Path(__file__).resolve().parents[2], timeout=120)
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "RuntimeError: internal bug" in out.stderr


@pytest.mark.parametrize("target", ["run.toml", "data.jsonl"])
@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v[0])
def test_an_unreadable_file_is_one_line(
    target: str,
    verb: tuple[str, ...],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A config or data file the user may not read is named on one line.

    (Denied by patching: a chmod cannot deny root, and CI may run as root.)
    Breaks if a PermissionError escapes a read site as a traceback.
    """
    config = _prepare(Case("good", ()), tmp_path)
    denied = tmp_path / target
    real_read_bytes, real_read_text = Path.read_bytes, Path.read_text

    def read_bytes(self: Path) -> bytes:
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    def read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(Path, "read_text", read_text)
    code, err = _run([*verb, config], capsys)
    assert code == 2 and "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"pollinate {verb[0]}: error: "), line
    assert str(denied) in line and "Permission denied" in line, line


OTHER_VERBS: list[tuple[str, Callable[[Path], list[str]], tuple[str, ...]]] = [
    (
        "client-join-empty-data",
        lambda tmp: [
            "client",
            "join",
            "--server",
            "127.0.0.1:1",
            "--insecure",
            "--data",
            str(_touch(tmp / "empty.jsonl")),
        ],
        ("pollinate client join: error: ", "empty.jsonl", "empty"),
    ),
    (
        "client-join-missing-root-cert",
        lambda tmp: [
            "client",
            "join",
            "--server",
            "127.0.0.1:1",
            "--root-cert",
            str(tmp / "ca.crt"),
            "--data",
            str(_good(tmp / "data.jsonl")),
        ],
        ("pollinate client join: error: ", "--root-cert", "ca.crt"),
    ),
    (
        "client-keygen-folder-is-file",
        lambda tmp: ["client", "keygen", str(_touch(tmp / "keys"))],
        ("pollinate client keygen: error: ", "keys"),
    ),
    (
        "certs-days-zero",
        lambda tmp: ["certs", str(tmp / "certs"), "--days", "0"],
        ("pollinate certs: error: ", "--days", "0"),
    ),
    (
        "certs-folder-is-file",
        lambda tmp: ["certs", str(_touch(tmp / "certs"))],
        ("pollinate certs: error: ", "certs"),
    ),
    (
        "compare-missing-run",
        lambda tmp: ["compare", str(tmp / "no-run")],
        ("pollinate compare: error: ", "no-run"),
    ),
]


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _good(path: Path) -> Path:
    path.write_bytes(GOOD_JSONL)
    return path


@pytest.mark.parametrize(
    ("argv", "expect"),
    [pytest.param(a, e, id=i) for i, a, e in OTHER_VERBS],
)
def test_other_verbs_refuse_on_one_line(
    argv: Callable[[Path], list[str]],
    expect: tuple[str, ...],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``client``, ``certs`` and ``compare`` report a bad path the same way.

    Breaks if a verb prints its own multi-line or unprefixed message, or lets
    an OSError on a path the user named escape as a traceback.
    """
    code, err = _run(argv(tmp_path), capsys)
    assert code == 2 and "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    for text in expect:
        assert text in line, (text, line)
