"""``raymoe ui``: the MLflow UI on the store that training logs to.

    raymoe ui                                   # http://127.0.0.1:5000, sqlite:///mlruns.db here
    raymoe ui --port 5001 --backend-store-uri sqlite:////data/runs/mlruns.db
    raymoe ui --dry-run                         # print the command, start nothing

Without ``--backend-store-uri`` it serves what :class:`raymoe.platform.tracking.Tracker` writes
by default: ``$MLFLOW_TRACKING_URI`` when that is a database URI, else ``mlruns.db`` in the
working directory (artifacts in ``mlruns/`` beside it). It runs ``mlflow server`` with one
worker and MLflow's job execution off (otherwise about 14 processes and 2.5 GiB) in the
foreground until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys

from raymoe.platform.tracking import (
    DEFAULT_ARTIFACT_DIR,
    TRACKING_URI_ENV,
    default_sqlite_uri,
    is_database_uri,
    sqlite_path,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
SERVER_WORKERS = 1
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
SHUTDOWN_TIMEOUT_S = 10.0
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ui`` subcommand."""
    parser = subparsers.add_parser(
        "ui", help="the MLflow UI on the runs this machine tracked", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--backend-store-uri",
        default=None,
        help="the MLflow store (default: $MLFLOW_TRACKING_URI if a database URI, else sqlite:///mlruns.db here)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the server command and exit")
    parser.set_defaults(func=run)


def backend_store_uri(explicit: str | None = None) -> str:
    """The store to serve: ``explicit``, else a database ``$MLFLOW_TRACKING_URI``, else the default SQLite."""
    if explicit:
        return explicit
    env = os.environ.get(TRACKING_URI_ENV)
    if env and is_database_uri(env):
        return env
    return default_sqlite_uri()


def server_command(store_uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> list[str]:
    """The ``mlflow server`` command line (this Python's mlflow; artifacts beside a SQLite file)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri]
    db = sqlite_path(store_uri)
    if db is not None:  # experiments created in the UI keep artifacts where the tracker's do
        cmd += ["--default-artifact-root", (db.parent / DEFAULT_ARTIFACT_DIR).as_uri()]
    return cmd + ["--host", host, "--port", str(port), "--workers", str(SERVER_WORKERS)]


def ui_url(host: str, port: int) -> str:
    """The address to open in a browser (a wildcard listen address is reached at 127.0.0.1)."""
    shown = DEFAULT_HOST if host in WILDCARD_HOSTS else host
    if ":" in shown:  # IPv6 literal
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def run(args: argparse.Namespace) -> int:
    """Start the MLflow server in the foreground; its exit code (0 after Ctrl-C)."""
    if not 0 < args.port < 65536:
        from raymoe.platform.config import ConfigError

        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    store = backend_store_uri(args.backend_store_uri)
    env_uri = os.environ.get(TRACKING_URI_ENV)
    if not args.backend_store_uri and env_uri and not is_database_uri(env_uri):
        print(f"note: {TRACKING_URI_ENV}={env_uri} is a server already; serving the local store {store}")
    cmd = server_command(store, args.host, args.port)
    env_text = " ".join(f"{k}={v}" for k, v in SERVER_ENV.items())
    if args.dry_run:
        print(f"{env_text} {shlex.join(cmd)}")
        print(f"MLflow UI would be at {ui_url(args.host, args.port)}")
        return 0
    print(f"MLflow UI at {ui_url(args.host, args.port)} (store {store}); Ctrl-C to stop", flush=True)
    return _run_foreground(cmd, {**os.environ, **SERVER_ENV})


def _run_foreground(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd`` until it exits; SIGTERM is forwarded, Ctrl-C stops it (terminate, then kill)."""
    proc = subprocess.Popen(cmd, env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum))
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to the child as well
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
