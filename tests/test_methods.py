"""The method registry and ``pollinate validate`` building every method's spec.

The registry is the one place a method name means something: a duplicate or
malformed entry must be refused, an unknown name must list the known ones,
and ``validate`` must name a bad setting of *each* method (it builds the
configured method's spec on a weightless skeleton of the model).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main
from protocols.methods import (
    Method,
    UnknownMethodError,
    get_method,
    load_plugin,
    method_names,
    methods,
    register_method,
    train_actions,
)
from server.config import load_config
from server.methods import ServerMethod, build_spec, server_method


def test_every_registered_method_resolves_on_both_sides() -> None:
    """Each entry's server plug-in provides ServerMethod and its client handler
    is importable: a typo in a registry reference fails here, not in a run."""
    assert set(method_names()) == {"lora", "fedkseed", "fedkseed-pro", "sfprompt"}
    for method in methods():
        assert isinstance(server_method(method.name), ServerMethod)
        assert callable(load_plugin(method.client))
    assert train_actions()["zo"] == get_method("fedkseed-pro").client


def test_unknown_duplicate_and_malformed_entries_are_refused() -> None:
    """An unknown name lists the known ones; re-registering a name, routing an
    action to a second handler, or a malformed entry raises."""
    with pytest.raises(UnknownMethodError, match="known: lora, fedkseed"):
        get_method("fedavg")
    with pytest.raises(ValueError, match="registered already"):
        register_method(get_method("lora"))
    lora = get_method("lora")
    with pytest.raises(ValueError, match="routed to"):
        register_method(
            Method(
                name="lora-copy",
                summary="x",
                action=lora.action,
                server=lora.server,
                client="client.other:handle",
                artefact="adapter",
                exports=("adapter",),
            )
        )
    with pytest.raises(ValueError, match="bad method entry"):
        Method(
            name="Bad Name",
            summary="x",
            action="train.x",
            server="nocolon",
            client="a:b",
            artefact="../outside",
            exports=("pickle",),
        )
    assert "lora-copy" not in method_names()


def test_config_refuses_an_unregistered_method() -> None:
    """``run.method`` is checked against the registry, naming the known ones."""
    with pytest.raises(ValueError, match="unknown method 'fedavg'"):
        load_config(None, {"run.method": "fedavg"})


def test_fedkseed_pro_is_fedkseed_with_pro_sampling() -> None:
    """Both variants build a ZOSpec; only the sampling differs."""
    base = {"model.name": "tiny-llama"}
    plain = build_spec(load_config(None, {**base, "run.method": "fedkseed"}))
    pro = build_spec(load_config(None, {**base, "run.method": "fedkseed-pro"}))
    assert plain.sampling == "uniform" and pro.sampling == "pro"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("method", "table", "setting", "named"),
    [
        ("lora", "lora", 'target_modules = ["qq_proj"]', "qq_proj"),
        ("fedkseed", "zo", 'include = ["nothing.here*"]', "nothing.here*"),
        ("fedkseed-pro", "zo", 'include = ["nope.*"]', "nope.*"),
        ("sfprompt", "split", "client_blocks = 5", "client_blocks"),
    ],
)
def test_validate_names_a_bad_setting_of_each_method(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    method: str,
    table: str,
    setting: str,
    named: str,
) -> None:
    """A setting the method's spec refuses makes ``validate`` exit 2 naming the
    method and the setting; the same config without it is valid."""
    head = f'[run]\nmethod = "{method}"\n[model]\nname = "tiny-llama"\n'
    bad = tmp_path / "bad.toml"
    bad.write_text(head + f"[{table}]\n{setting}\n")
    good = tmp_path / "good.toml"
    good.write_text(head)
    assert main(["validate", str(bad)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert method in err and named in err
    assert main(["validate", str(good)]) == 0
