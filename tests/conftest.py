"""Shared test fixtures: a local Ray per test module, a private PostgreSQL server, and GPU skipping."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_num_workers_soft_limit", "4")  # as chatforge.runtime.init_ray sets for 2 CPUs
# every command tracks by default: the tests' runs go to a store of their own, not the checkout's runs/mlflow.db
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp(prefix='chatforge-mlflow-')}/mlflow.db")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def ray_local():
    """A 2-CPU local Ray for one test module, shut down afterwards."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_with_dashboard():
    """A 2-CPU local Ray with its dashboard (the state API, which Tune's stopped trials need) on 127.0.0.1."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------- PostgreSQL


def _postgres_bin_dir() -> Path | None:
    """The dir holding initdb and pg_ctl: from PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent

    def version(initdb_path: str) -> tuple[int, ...]:
        name = Path(initdb_path).parent.parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True)
    return Path(candidates[0]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A private PostgreSQL server on 127.0.0.1 for the test session; yields a SQLAlchemy psycopg URL.

    initdb refuses to run as root, so under root the server runs as the `postgres` OS user (Debian's package
    creates it). Skipped when no PostgreSQL binaries are found, except under CI, where `make setup` installs them.
    """
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        reason = "no PostgreSQL binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin; `make setup` installs them"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    run_as: dict = {}
    if os.geteuid() == 0:
        import pwd

        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` OS user for initdb (it refuses root)")
        run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    # not under pytest's tmp dir: that is private to the user running pytest, and the server may run as another
    root = tempfile.mkdtemp(prefix="chatforge-pg-")
    if run_as:
        os.chown(root, run_as["user"], run_as["group"])
    data, sockets, log = Path(root, "data"), Path(root, "sockets"), Path(root, "server.log")
    password = secrets.token_hex(12)
    password_file = Path(root, "password")
    password_file.write_text(password + "\n")
    if run_as:
        os.chown(password_file, run_as["user"], run_as["group"])

    def run(*args: str) -> None:
        subprocess.run(
            [str(a) for a in args], check=True, cwd=root, capture_output=True, text=True, timeout=120, **run_as
        )

    port = _free_port()
    try:
        run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--pwfile", password_file, "--auth-local=trust",
            "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync")  # fmt: skip
        run("mkdir", "-p", sockets)
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off -c max_connections=200"
        run(bin_dir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o", options, "start")
    except subprocess.CalledProcessError as err:
        server_log = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"starting PostgreSQL failed: {err.stderr}\n{server_log}") from err
    try:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=port, user="postgres", password=password, dbname="postgres", autocommit=True
        ) as connection:
            connection.execute("CREATE DATABASE chatforge_test")
        yield f"postgresql+psycopg://postgres:{password}@127.0.0.1:{port}/chatforge_test"
    finally:
        subprocess.run(
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            cwd=root, capture_output=True, timeout=120, **run_as,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
