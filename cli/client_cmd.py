"""``pollinate client join|keygen``: a device joins a real federation."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from rich.console import Console

from cli.errors import CommandError
from protocols.methods import method_names

__all__ = ["add_parser"]

EPILOG = """examples:
  pollinate client keygen keys/ --name hospital-3   # give keys/hospital-3.pub to the server
  pollinate client join --server 10.0.0.5:9092 --data my.jsonl --root-cert certs/ca.crt \\
      --auth-key keys/hospital-3.key                # joins as label hospital-3
  pollinate client join --server 127.0.0.1:9092 --data my.jsonl --insecure   # local only
  pollinate client join --server 10.0.0.5:9092 --data my.jsonl --root-cert certs/ca.crt \
      --runtime onnx --bundle bundles/edge          # FedKSeed without torch (edge device)
  pollinate client join --server 10.0.0.5:9092 --data my.jsonl --root-cert certs/ca.crt \
      --lora-rank 4                                 # a small device trains LoRA rank 4
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``client`` and its subcommands."""
    parser = sub.add_parser(
        "client",
        help="join a federation as a device (SuperNode daemon)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = parser.add_subparsers(dest="client_command", required=True)
    join = cmds.add_parser("join", help="run this node's ClientApp against a server")
    join.add_argument("--server", required=True, help="HOST:PORT of the server")
    join.add_argument(
        "--data", required=True, type=Path, help="local JSON/JSONL/CSV data"
    )
    join.add_argument(
        "--label",
        help="a stable node name (default: the --auth-key file's name, which an "
        "authenticating server requires, else this host's name)",
    )
    tls = join.add_mutually_exclusive_group(required=True)
    tls.add_argument(
        "--root-cert", type=Path, help="CA certificate of the server (TLS)"
    )
    tls.add_argument("--insecure", action="store_true", help="plaintext (local only)")
    join.add_argument(
        "--auth-key", type=Path, help="private key registered with the server"
    )
    join.add_argument(
        "--method",
        action="append",
        default=[],
        choices=method_names(),
        help="accept only these methods (repeatable; default: all)",
    )
    join.add_argument(
        "--runtime",
        choices=("torch", "onnx"),
        default="torch",
        help="train with PyTorch, or with ONNX Runtime on an edge bundle "
        "(FedKSeed only; no torch needed on this device)",
    )
    join.add_argument(
        "--bundle",
        type=Path,
        help="--runtime onnx: the edge bundle (pollinate export RUN --format edge)",
    )
    join.add_argument(
        "--lora-rank",
        type=_lora_rank,
        help="LoRA: the adapter rank this node trains (one the server's "
        "lora.client_ranks allows; default: the run's lora.rank)",
    )
    join.add_argument("--state-dir", type=Path, default=Path(".pollinate-node"))
    join.add_argument(
        "--local-port", type=int, default=9094, help="SuperNode's local API port"
    )
    join.add_argument("--max-restarts", type=int, default=100)
    join.set_defaults(handler=_join)
    keygen = cmds.add_parser("keygen", help="make this node's authentication key pair")
    keygen.add_argument("folder", type=Path)
    keygen.add_argument(
        "--name",
        default=socket.gethostname(),
        help="the node's label: the server knows the node as <name>.pub "
        "(default: this host's name)",
    )
    keygen.set_defaults(handler=_keygen)


def _lora_rank(text: str) -> int:
    """``--lora-rank``: an int in 1..MAX_LORA_RANK (the bound a hello may report)."""
    from protocols.messages import MAX_LORA_RANK

    try:
        rank = int(text)
    except ValueError:
        rank = 0
    if not 1 <= rank <= MAX_LORA_RANK:
        raise argparse.ArgumentTypeError(
            f"must be an int in 1..{MAX_LORA_RANK}, got {text!r}"
        )
    return rank


def _join(args: argparse.Namespace, console: Console) -> int:
    # Here, not at import: --help stays light.
    from client.daemon import JoinSettings, check_runtime, run_daemon
    from corpora import load_examples
    from protocols.edge_bundle import EdgeBundleError

    # Read once here, so a bad file is one line now, not an error per round.
    load_examples(str(args.data))
    for flag, path in (("--root-cert", args.root_cert), ("--auth-key", args.auth_key)):
        if path is not None and not path.is_file():
            raise CommandError(f"{flag}: no file at {path}")
    label = args.label or (args.auth_key.stem if args.auth_key else None)
    label = label or socket.gethostname()
    if args.auth_key is not None and label != args.auth_key.stem:
        console.print(
            f"[yellow]warning[/]: --label {label} differs from the key's name "
            f"{args.auth_key.stem}: a server with --auth-keys accepts a node only "
            "under the name of its registered key"
        )
    settings = JoinSettings(
        server=args.server,
        data=args.data,
        label=label,
        root_certificates=args.root_cert,
        insecure=args.insecure,
        auth_key=args.auth_key,
        state_dir=args.state_dir,
        local_port=args.local_port,
        max_restarts=args.max_restarts,
        methods=tuple(args.method),
        runtime=args.runtime,
        bundle=args.bundle,
        lora_rank=args.lora_rank,
    )
    try:  # the bundle is checked here, before any process starts
        check_runtime(settings)
    except (ValueError, EdgeBundleError) as exc:
        raise CommandError(f"--runtime {args.runtime}: {exc}") from None

    def say(text: str) -> None:
        console.print(text)
        console.file.flush()  # a daemon's log is read while it runs

    return run_daemon(settings, say=say)


def _keygen(args: argparse.Namespace, console: Console) -> int:
    # Here, not at import: --help stays light.
    from client.daemon import make_node_key

    if args.folder.exists() and not args.folder.is_dir():
        raise CommandError(f"{args.folder} is a file, not a folder for the keys")
    try:
        private, public = make_node_key(args.folder, args.name)
    except FileExistsError as exc:
        raise CommandError(f"{exc}: keep it, or remove it for a new key") from None
    except OSError as exc:
        raise CommandError(
            f"{args.folder}: cannot write the key pair: {exc.strerror or exc}"
        ) from None
    console.print(
        f"private key: {private} (keep it on this node)\npublic key: {public} (give it to the server)"
    )
    return 0
