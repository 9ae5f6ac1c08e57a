"""The method registry: every fine-tuning method Pollinate runs, in one table.

A method is a name (``lora``, ``fedkseed``, ``fedkseed-pro``, ``sfprompt``)
and everything it contributes, recorded in one :class:`Method` entry:

* the message action its training instruction travels as (``train.<action>``),
  which routes it to the device's handler;
* its server plug-in (``module:Class``, see :class:`server.methods.ServerMethod`):
  the config-to-spec builder, the round driver that holds the global state, and
  the model that export writes;
* its client handler (``module:function``): decodes the instruction, trains on
  the device, encodes the reply;
* its final artefact in the run folder and the export formats it offers;
* fixed options that distinguish variants sharing code (FedKSeed-Pro is
  FedKSeed with ``sampling = "pro"``).

Every other module asks this registry; no method name is compared as a string
anywhere else. The two plug-ins are named by import path, as Flower's
``pyproject.toml`` names a ServerApp, so this bottom-layer table imports
neither side: the server resolves its plug-in, a device resolves its handler,
and a device never imports server code. Resolution is lazy, so the table is
cheap to import (the CLI builds its ``--help`` from it).

Adding a method: write its spec (:mod:`protocols.specs`), messages, server
plug-in and client handler, then one :func:`register_method` call here.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "EXPORT_FORMATS",
    "FEDKSEED",
    "FEDKSEED_PRO",
    "LORA",
    "SFPROMPT",
    "Method",
    "UnknownMethodError",
    "get_method",
    "load_plugin",
    "method_names",
    "methods",
    "register_method",
    "train_actions",
]

EXPORT_FORMATS = ("adapter", "merged", "onnx", "edge")
"""Every export format some method offers (see :mod:`server.export`); ``edge``
is the bundle an inference-only device trains (:mod:`protocols.edge_bundle`)."""

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_ACTION = re.compile(r"^[a-z_][a-z0-9_]*$")  # a Flower action: a Python identifier
_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class UnknownMethodError(ValueError):
    """A method name that is not registered (the message lists the known ones)."""


@dataclass(frozen=True, slots=True)
class Method:
    """One registered method.

    Attributes
    ----------
    name : str
        The name users write in ``[run] method``.
    summary : str
        One line for help texts.
    action : str
        Flower action of its training instruction (``train.<action>``);
        variants that share a handler share it.
    server : str
        ``module:Class`` of the server plug-in; the class is built with this
        entry.
    client : str
        ``module:function`` of the device handler.
    artefact : str
        The final artefact, relative to the run folder.
    exports : tuple[str, ...]
        Export formats it offers, a subset of :data:`EXPORT_FORMATS`.
    options : Mapping[str, str]
        Fixed settings of this variant (read with :meth:`option`).
    """

    name: str
    summary: str
    action: str
    server: str
    client: str
    artefact: str
    exports: tuple[str, ...]
    options: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if not _NAME.match(self.name):
            problems.append(f"name {self.name!r} is not lower-case words with '-'")
        if not _ACTION.match(self.action):
            problems.append(f"action {self.action!r} is not a Python identifier")
        for what, ref in (("server", self.server), ("client", self.client)):
            if not _REF.match(ref):
                problems.append(f"{what} {ref!r} is not 'module:attribute'")
        unknown = set(self.exports) - set(EXPORT_FORMATS)
        if unknown or not self.exports:
            problems.append(
                f"exports {list(self.exports)} must be a non-empty subset of "
                f"{list(EXPORT_FORMATS)}"
            )
        if self.artefact.startswith(("/", ".")) or ".." in self.artefact.split("/"):
            problems.append(f"artefact {self.artefact!r} must stay in the run folder")
        if problems:
            raise ValueError("bad method entry: " + "; ".join(problems))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def option(self, key: str, default: str) -> str:
        """A fixed option of this variant, or ``default``."""
        return self.options.get(key, default)


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry and return it.

    Raises
    ------
    ValueError
        If a method of that name is registered already, or an action is
        shared with a method whose client handler differs.
    """
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered already")
    for other in _REGISTRY.values():
        if other.action == method.action and other.client != method.client:
            raise ValueError(
                f"method {method.name!r}: action {method.action!r} is routed to "
                f"{other.client} (method {other.name!r}), not {method.client}"
            )
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The method registered as ``name``.

    Raises
    ------
    UnknownMethodError
        If there is none; the message lists every registered name.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; known: {', '.join(method_names())}"
        ) from None


def method_names() -> tuple[str, ...]:
    """Every registered name, in registration order."""
    return tuple(_REGISTRY)


def methods() -> tuple[Method, ...]:
    """Every registered method, in registration order."""
    return tuple(_REGISTRY.values())


def train_actions() -> dict[str, str]:
    """Each training action and the ``module:function`` that handles it."""
    return {m.action: m.client for m in _REGISTRY.values()}


def load_plugin(ref: str) -> Any:
    """Import the object a ``module:attribute`` reference names.

    Raises
    ------
    ImportError
        If the module or attribute does not exist (the message names both).
    """
    module_name, _, attribute = ref.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ImportError(f"{module_name} has no attribute {attribute!r}") from None


LORA = register_method(
    Method(
        name="lora",
        summary="LoRA adapters trained on the device, averaged on the server",
        action="lora",
        server="server.lora_driver:LoraMethod",
        client="client.lora_handler:handle",
        artefact="adapter",
        exports=("adapter", "merged", "onnx"),
    )
)


def _fedkseed(name: str, summary: str, sampling: str) -> Method:
    """FedKSeed and its variants share every part but the seed sampling."""
    return Method(
        name=name,
        summary=summary,
        action="zo",
        server="server.zo_driver:ZoMethod",
        client="client.zo_handler:handle",
        artefact="model/perturbed.safetensors",
        exports=("adapter", "merged", "onnx", "edge"),
        options={"sampling": sampling},
    )


FEDKSEED = register_method(
    _fedkseed(
        "fedkseed",
        "zeroth-order full-parameter tuning over K seeds, uniform sampling",
        "uniform",
    )
)
FEDKSEED_PRO = register_method(
    _fedkseed("fedkseed-pro", "FedKSeed with seeds sampled by their importance", "pro")
)
SFPROMPT = register_method(
    Method(
        name="sfprompt",
        summary="split learning: soft prompts and tail on the device, body on the server",
        action="sfprompt",
        server="server.split_driver:SplitMethod",
        client="client.split_handler:handle",
        artefact="model/prompts_and_tail.safetensors",
        exports=("adapter", "onnx"),
    )
)
