"""`rlsub-tui serve`: the explorer in a web browser through textual-serve (one app process per browser tab)."""

from __future__ import annotations

import argparse
import shlex
import sys

from rlsub_tui.util.errors import InputError


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlsub-tui serve", usage="rlsub-tui serve [BASE RUN ...] [options] "
                                "[--host 127.0.0.1] [--port 8000]",
                                description="Serve the explorer to a web browser (e.g. through an SSH tunnel). "
                                            "Every other option is the explorer's.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    return p


def explorer_command(explorer_argv: list[str]) -> str:
    """The shell command textual-serve runs for each browser tab: this Python, this package, these arguments."""
    return shlex.join([sys.executable, "-m", "rlsub_tui", *explorer_argv])


def run_serve(argv: list[str], check_explorer_args) -> int:
    """check_explorer_args(argv) refuses bad explorer arguments here, once, before anything listens."""
    args, explorer_argv = serve_parser().parse_known_args(argv)
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: give a port between 1 and 65535.")
    check_explorer_args(explorer_argv)
    try:
        from textual_serve.server import Server
    except ImportError:
        raise InputError("serving needs textual-serve: pip install 'rlsub-tui[serve]' (or textual-serve).") from None
    server = Server(explorer_command(explorer_argv), host=args.host, port=args.port, title="rlsub-tui")
    print(f"rlsub-tui: serving the explorer on http://{args.host}:{args.port} (Ctrl+C stops)", file=sys.stderr)
    server.serve()
    return 0
