"""infra/: the manifests parse, the Ray cluster YAML passes Ray's own schema, and every
image, version and command they name exists in this repository or its environment."""
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import psutil
import pytest
import ray
import yaml
from ray.autoscaler._private.util import validate_config

from pipeline.cli import STAGES

from helpers import ROOT, ray_nodes_possible, run, spaced_project, stack

INFRA = ROOT / "infra"
IMAGE = "ghcr.io/your-org/vae-mnist:latest"  # what infra/docker/Dockerfile's build line tags


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_every_manifest_parses():
    paths = sorted(INFRA.rglob("*.yaml"))
    assert {p.relative_to(INFRA).as_posix() for p in paths} >= {
        "ray/cluster.yaml", "kuberay/rayjob.yaml", "kuberay/raycluster.yaml", "kuberay/params-configmap.yaml",
        "mlflow/compose.yaml"}
    for path in paths:
        assert documents(path), f"{path} is empty"


def test_cluster_launcher_yaml_passes_rays_schema():
    config = yaml.safe_load((INFRA / "ray/cluster.yaml").read_text())
    validate_config(config)
    assert config["docker"]["image"] == IMAGE
    broken = {**config, "max_worker": 4}  # a typo must not pass
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_kuberay_manifests_run_our_image_at_our_ray_version():
    dockerfile = (INFRA / "docker/Dockerfile").read_text()
    base_version = re.search(r"^FROM rayproject/ray:([\d.]+)-py311-gpu$", dockerfile, re.M).group(1)
    assert base_version == ray.__version__  # the image's Ray is the Ray the project runs
    assert f"-t {IMAGE} ." in dockerfile
    job = documents(INFRA / "kuberay/rayjob.yaml")[0]
    cluster = documents(INFRA / "kuberay/raycluster.yaml")[0]
    assert (job["kind"], cluster["kind"]) == ("RayJob", "RayCluster")
    for spec in (job["spec"]["rayClusterSpec"], cluster["spec"]):
        assert spec["rayVersion"] == base_version
        assert spec["authOptions"] == {"mode": "token"}  # no client without the cluster's token
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            assert {c["image"] for c in group["template"]["spec"]["containers"]} == {IMAGE}
            # Credentials reach every node from a Secret, as its environment: not the job's
            # runtime_env, which Ray keeps in its job table.
            assert all(c["envFrom"] == [{"secretRef": {"name": "vae-mnist-credentials"}}]
                       for c in group["template"]["spec"]["containers"])
        assert all(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
                   for g in spec["workerGroupSpecs"])


def test_no_manifest_names_a_secret_value():
    """Passwords, keys and tokens come from the environment (compose) or a Secret (KubeRay),
    and the job's runtime_env, which Ray keeps in its job table, carries none."""
    runtime_env = yaml.safe_load(documents(INFRA / "kuberay/rayjob.yaml")[0]["spec"]["runtimeEnvYAML"])
    assert set(runtime_env["env_vars"]) == {"MLFLOW_TRACKING_URI"}
    for path in INFRA.rglob("*.yaml"):
        text = path.read_text()
        for name, value in re.findall(r"(\w*(?:SECRET|PASSWORD|TOKEN)\w*)\s*:\s*(\S+)", text):
            assert value.startswith("${"), (path, name)  # compose takes it from the environment


def test_rayjob_runs_existing_stages_with_params_that_validate():
    from pipeline.params import Params

    job = documents(INFRA / "kuberay/rayjob.yaml")[0]
    for command in job["spec"]["entrypoint"].split("&&"):
        program, stage = command.split()
        assert program == "vae" and stage in STAGES
    configmap = documents(INFRA / "kuberay/params-configmap.yaml")[0]
    params = Params.model_validate(yaml.safe_load(configmap["data"]["params.yaml"]))
    assert params.train.storage_path.startswith("s3://") and params.train.use_gpu is True
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"][0]["configMap"]["name"] == configmap["metadata"]["name"]
    assert head["containers"][0]["volumeMounts"][0]["mountPath"] == "/app/params.yaml"
    assert "WORKDIR /app" in (INFRA / "docker/Dockerfile").read_text()


def test_mlflow_stack_is_postgres_and_s3_behind_one_server():
    compose = documents(INFRA / "mlflow/compose.yaml")[0]
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    command = services["mlflow"]["command"]
    assert command[:2] == ["mlflow", "server"]
    store = command[command.index("--backend-store-uri") + 1]
    assert store.startswith("postgresql+psycopg://") and "@postgres:5432/" in store
    assert command[command.index("--artifacts-destination") + 1].startswith("s3://")
    assert (INFRA / "mlflow" / services["mlflow"]["build"]["dockerfile"]).is_file()
    for service in services.values():  # nothing listens beyond this machine
        assert all(str(port).startswith("127.0.0.1:") for port in service.get("ports", []))
    mlflow_image = (INFRA / "mlflow/Dockerfile").read_text()
    import mlflow

    assert f"ghcr.io/mlflow/mlflow:v{mlflow.__version__}" in mlflow_image


def test_the_image_installs_the_lock_with_the_makefiles_uv():
    dockerfile = (INFRA / "docker/Dockerfile").read_text()
    uv_version = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"uv=={uv_version}" in dockerfile
    assert "COPY --chown=ray:users pyproject.toml uv.lock" in dockerfile
    syncs = re.findall(r"uv sync (.*)", dockerfile)
    assert syncs and all("--frozen" in s for s in syncs)  # the lock as it is, never re-resolved
    assert "pip install" not in dockerfile.replace(f"pip install --no-cache-dir uv=={uv_version}", "")


def test_mlflow_answers_the_manifests_host_header_and_refuses_a_foreign_one(mlflow_server):
    """MLflow 3 answers 403 to a Host header it does not know, while /health still says 200:
    the deployment's clients call it http://mlflow:5000 (infra/kuberay/rayjob.yaml), so the
    server, started as `make up` and infra/ start it, must name that host."""
    job = documents(INFRA / "kuberay/rayjob.yaml")[0]
    uri = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"]
    host = httpx.URL(uri).netloc.decode()
    assert host == "mlflow:5000"
    compose = documents(INFRA / "mlflow/compose.yaml")[0]["services"]["mlflow"]["command"]
    assert compose[compose.index("--allowed-hosts") + 1] == stack.ALLOWED_HOSTS
    search = f"{mlflow_server}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(search, headers={"Host": host}).status_code == 200
    assert httpx.get(search, headers={"Host": "evil.example:5000"}).status_code == 403
    assert httpx.get(search).status_code == 200  # 127.0.0.1:<port>


def test_a_server_that_refuses_the_host_name_is_named_in_one_line(mlflow_server, tmp_path, monkeypatch):
    """127.1 is 127.0.0.1 by a name the server does not allow: a stage's first request gets 403,
    said in one line with the way out, not as MLflow's traceback."""
    from pipeline import tracking
    from pipeline.files import Layout

    foreign = mlflow_server.replace("127.0.0.1", "127.1")
    tracking.require_reachable(foreign)  # /health answers whatever the name
    monkeypatch.setenv("MLFLOW_TRACKING_URI", foreign)
    said = rf"^MLflow tracking server {re.escape(foreign)} refused the pipeline's request \(HTTP 403\): "
    with pytest.raises(ConnectionError, match=said + r".* \(`mlflow server --allowed-hosts`\)$"):
        tracking.start_run(Layout(tmp_path), {}, {})
    assert not Layout(tmp_path).mlflow_run.exists()


def test_the_s3_server_refuses_wrong_and_missing_keys_and_listens_on_loopback_only(s3):
    """SeaweedFS as `make up` starts it: the generated identity alone gets in (a moto server
    would accept any key), and none of its services listens beyond 127.0.0.1."""
    import botocore.exceptions
    import psutil

    def listing(env):
        return stack.s3_client(env).list_objects_v2(Bucket="dvc")

    assert listing(s3)["ResponseMetadata"]["HTTPStatusCode"] == 200
    with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch"):
        listing({**s3, "AWS_SECRET_ACCESS_KEY": s3["AWS_SECRET_ACCESS_KEY"] + "x"})
    assert httpx.get(f"{s3['AWS_ENDPOINT_URL']}/dvc").status_code == 403  # anonymous: AccessDenied
    port = int(s3["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    (server,) = {c.pid for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port}
    addresses = {c.laddr.ip for c in psutil.net_connections("inet") if c.pid == server and c.status == "LISTEN"}
    assert len(addresses) == 1 and addresses == {"127.0.0.1"}
    # Its S3 gateway's socket and its logs are in its own folder: weed's default, /tmp, keeps them.
    root = Path(next(a for a in psutil.Process(server).cmdline() if a.startswith("-logdir=")).split("=", 1)[1])
    assert str(root / "s3.sock") in {c.laddr for c in psutil.net_connections("unix") if c.pid == server}
    assert not Path(f"/tmp/seaweedfs-s3-{port}.sock").exists() and list(root.glob("weed.*.log.INFO.*"))


def test_free_ports_are_distinct_and_free():
    """A node's ports come from one free_ports() call. Bound and closed one at a time, 500
    ports here held 3 to 13 repeats (CI once gave a Ray node two components on one port)."""
    import socket

    ports = stack.free_ports(500)
    assert len(set(ports)) == 500
    for port in ports[:20]:  # each one free to bind now
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_the_nodes_of_one_machine_share_its_gpus_out(monkeypatch):
    """Each GPU to one node: every `ray start` of one machine would otherwise claim them all."""
    assert stack.deal_gpus(["0"], 2) == [["0"], []]
    assert stack.deal_gpus(["0", "1", "2"], 2) == [["0", "2"], ["1"]]
    assert stack.deal_gpus([], 3) == [[], [], []]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")  # the caller's choice, as CUDA reads it
    assert stack.machine_gpus() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert stack.machine_gpus() == []


def test_the_test_clusters_nodes_hold_the_machines_gpus_once(ray_address):
    """On a 1-GPU machine each node used to count the one GPU: two GPUs for Ray, two NCCL
    workers on one device. Here (no GPU) both shares are empty; on a GPU node this checks it."""
    from pipeline.ray_connect import node_resources

    held = sorted(node.get("GPU", 0) for node in node_resources())
    assert held == sorted(len(share) for share in stack.deal_gpus(stack.machine_gpus(), 2))


def test_a_ray_node_that_misses_rays_startup_timeout_gets_one_more_start(tmp_path):
    """Ray's fixed 30 s cannot be missed on purpose, so the node here is a shell that prints what
    `ray start` prints: Ray's own failure (the pinned Ray's message), then its start line."""
    import inspect

    import ray._private.node
    import ray.scripts.scripts

    assert stack.RAY_STARTUP_TIMEOUT in inspect.getsource(ray._private.node)
    assert "Ray runtime started." in inspect.getsource(ray.scripts.scripts)  # what ray_cluster waits for
    log = tmp_path / "node.log"
    timeout = f"echo 'Exception: {stack.RAY_STARTUP_TIMEOUT}. This could happen because ...'; exit 1"
    started = "echo 'Ray runtime started.'; exec sleep 60"

    def node(*scripts: str):
        launched = []

        def launch():
            launched.append(stack.start(["sh", "-c", scripts[len(launched)]], log))
            return launched[-1], {"try": len(launched)}
        return launch, launched

    launch, launched = node(timeout, started)
    process, details = stack.start_twice(launch, lambda: "started." in log.read_text(), log, "a node")
    try:
        assert details == {"try": 2} and process.poll() is None and launched[0].poll() == 1
        assert stack.RAY_STARTUP_TIMEOUT in (tmp_path / "node.log.1").read_text()
    finally:
        stack.stop(process)
    for scripts, tries in (((timeout, timeout), 2), (("echo 'bad --num-cpus'; exit 2", started), 1)):
        launch, launched = node(*scripts)
        with pytest.raises(RuntimeError, match="a node did not start") as failed:
            stack.start_twice(launch, lambda: "started." in log.read_text(), log, "a node")
        assert len(launched) == tries and scripts[0].split("'")[1] in str(failed.value)


def test_a_ray_node_started_once_more_keeps_its_gpus(monkeypatch):
    """The head's second start took the next node's GPU share, and the last node then found
    none left (StopIteration, seen in the suite on a loaded machine). Each `ray start` here is a
    shell that prints what Ray prints: the head's first start misses Ray's timeout."""
    launches = []

    def start(cmd, log, env=None, cwd=None):
        launches.append(("head" if "--head" in cmd else "node", env["CUDA_VISIBLE_DEVICES"]))
        missed = f"echo 'Exception: {stack.RAY_STARTUP_TIMEOUT}.'; exit 1"
        script = missed if len(launches) == 1 else "echo 'Ray runtime started.'; exec sleep 60"
        with open(log, "w") as out:
            return subprocess.Popen(["sh", "-c", script], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    monkeypatch.setattr(stack, "start", start)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    address, nodes, dirs = stack.ray_cluster(1, {}, count=2)
    try:
        assert launches == [("head", "0,2"), ("head", "0,2"), ("node", "1")]
    finally:
        for node in nodes:
            stack.stop_ray_node(node)
        for temp_dir in dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.integration  # starts Ray nodes
def test_ctrl_c_while_a_ray_cluster_starts_leaves_no_node_behind(signals_kept):
    """`make up` interrupted while its second Ray node started: the head and that node ran on,
    recorded nowhere, beyond `make down`'s reach. Ctrl-C reaches the terminal's process group,
    not the nodes, which run in sessions of their own."""
    ray_nodes_possible()
    starting = subprocess.Popen([sys.executable, "-c", "import stack; stack.ray_cluster(1, stack.ray_auth())"],
                                cwd=ROOT / "infra/local", start_new_session=True, stderr=subprocess.PIPE, text=True)
    deadline, nodes = time.monotonic() + 120, []
    try:
        while len(nodes) < 2:  # the head has started (the second node starts once it has)
            assert starting.poll() is None and time.monotonic() < deadline, starting.stderr.read()
            nodes = [child.pid for child in psutil.Process(starting.pid).children() if "start" in child.cmdline()]
            time.sleep(0.05)
        os.killpg(starting.pid, signal.SIGINT)
        assert starting.wait(timeout=60) != 0
        assert "KeyboardInterrupt" in starting.stderr.read()
        left = [p.pid for p in psutil.process_iter() if p.is_running() and _session_of(p.pid) in nodes]
        assert not left, f"still running from the nodes' sessions: {left}"
    finally:  # failed or not, no node outlives the test (a failed run once left a cluster running for hours)
        stack.stop(starting, timeout_s=1)
        for node in nodes:
            stack.stop_ray_node(node)


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_make_up_from_a_path_with_a_space_says_so_before_starting_anything(tmp_path):
    """Its Ray nodes could start no worker with a runtime env (test_ray_connect: the local Ray's
    mend cannot reach a cluster's nodes). The Makefile's own commands, quoted, get that far."""
    root = spaced_project(tmp_path, "Makefile", "uv.lock", ".tools", "infra")
    # -o system-packages: not the apt-get a root without PostgreSQL would get; nothing to do with this.
    result = run(["make", "--no-print-directory", "-o", "system-packages", "up", f"STACK={tmp_path / 'stack'}"], root,
                 check=False, timeout=120)
    assert result.returncode != 0 and "a path with a space" in result.stderr, result.stdout + result.stderr
    assert f"Ray's nodes would run {root}/.venv/bin/python" in result.stderr
    assert not (tmp_path / "stack").exists()  # nothing started, nothing recorded


def test_make_repro_outside_a_git_repository_says_so_before_installing(tmp_path):
    """A downloaded archive of the project has no .git: DVC refused it only after the install."""
    (tmp_path / "Makefile").write_bytes((ROOT / "Makefile").read_bytes())
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}  # no repository above it either
    result = run(["make", "--no-print-directory", "repro"], tmp_path, env=env, check=False, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith(
        f"make repro: {tmp_path} is not a git repository (a downloaded archive?), and DVC needs one: "), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Makefile"]  # nothing installed


def test_a_missing_python_is_named_and_uv_downloads_none(tmp_path):
    """`make` names a missing PYTHON and how to name another, installing nothing; and its recipes
    forbid uv to download a Python build from GitHub (only the package index is fetched), which
    `uv sync --python python3.10` tried on this machine when the name found none."""
    for name in ("Makefile", "uv.lock"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    result = run(["make", "--no-print-directory", "install", "PYTHON=python3.99"], tmp_path, check=False, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith(
        "make: cannot run python3.99; install it, or name another Python, 3.11 to 3.13: make PYTHON=<its path> "
        "install"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Makefile", "uv.lock"]
    shown = run(["make", "-s", "--eval", "show: ; @echo $$UV_PYTHON_DOWNLOADS", "show"], tmp_path)
    assert shown.stdout == "never\n"


def test_the_wheelhouse_lists_the_lock_for_the_node_less_its_own_torch():
    """infra/wheelhouse.py's requirements (what `make wheelhouse` downloads): uv.lock's versions
    for the node's Python, markers already applied (pip would apply its own interpreter's),
    nothing that only torch needs, and what installs the project itself."""
    import tomllib

    from pipeline.environment import locked_packages

    requirements = runpy.run_path(str(INFRA / "wheelhouse.py"))["requirements"]
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    pins = {py: dict(line.split("==") for line in requirements(py) if "==" in line) for py in ("3.11", "3.12", here)}
    for py, pinned in pins.items():
        assert not [name for name in pinned if name in ("torch", "torchvision", "triton")
                    or name.startswith(("nvidia-", "cuda-"))], py
        assert pinned["ray"] == "2.60.0" and pinned["mlflow"] == "3.17.2" and "onnxruntime-gpu" in pinned
        assert {"setuptools", "wheel"} <= {re.split("[=<>]", r)[0] for r in requirements(py)}
    # This interpreter's pins are the lock's for it, and where the lock has another numpy for
    # newer Pythons (today: 2.4.6 and 2.5.5), 3.12 gets that one.
    assert pins[here]["numpy"] == locked_packages()["numpy"]
    numpys = {p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"] if p["name"] == "numpy"}
    assert pins["3.12"]["numpy"] in numpys and (len(numpys) == 1) == (pins["3.12"]["numpy"] == pins["3.11"]["numpy"])


def test_the_wheelhouse_leaves_out_what_the_node_lists_at_its_own_versions():
    """`--node-has`: a node's `pip list --format=freeze` (any spelling of the names) leaves
    those packages out of the wheelhouse, with what only they need; the rest stays pinned."""
    wheelhouse = runpy.run_path(str(INFRA / "wheelhouse.py"))
    listing = "PyYAML==6.0.2\nnumpy==1.26.4\n# a comment\n\nsetuptools==80.0\nmlflow @ file:///wheels/mlflow.whl\n"
    node_own = wheelhouse["node_packages"](listing)
    assert node_own == ("pyyaml", "numpy", "setuptools", "mlflow")
    full = wheelhouse["requirements"]("3.12")
    smaller = wheelhouse["requirements"]("3.12", wheelhouse["NODE_OWN"] + node_own)
    names = {re.split("[=<>]", r)[0] for r in smaller}
    assert not names & {"pyyaml", "numpy", "mlflow"} and {"ray", "onnxruntime-gpu"} <= names
    # The build backend stays, node or not: an isolated build of the source archive needs its own.
    assert {"setuptools", "wheel"} <= names
    only_mlflow = wheelhouse["needed_without"](wheelhouse["NODE_OWN"]) - wheelhouse["needed_without"](
        wheelhouse["NODE_OWN"] + ("mlflow",)) - {"mlflow"}
    assert "mlflow-skinny" in only_mlflow and not only_mlflow & names  # reached only through mlflow
    assert names < {re.split("[=<>]", r)[0] for r in full}


def test_the_wheelhouse_takes_the_extras_asked_for_and_the_packages_named():
    """The project's extras only when asked for (dev: pytest, playwright...), and `--with` a
    locked package outside them with what it needs (httpx, for a GPU node's few tests, where the
    rest of dev would be 80 MiB of dead weight); a name the lock lacks is an error naming it."""
    wheelhouse = runpy.run_path(str(INFRA / "wheelhouse.py"))

    def names(**kwargs) -> set[str]:
        return {re.split("[=<>]", r)[0] for r in wheelhouse["requirements"]("3.12", **kwargs)}
    runtime, dev, with_httpx = names(), names(extras=("dev",)), names(also=("httpx",))
    assert not runtime & {"pytest", "httpx", "playwright"} and {"pytest", "httpx", "playwright"} <= dev
    assert {"httpx", "httpcore"} <= with_httpx - runtime and not with_httpx - runtime & {"pytest", "playwright"}
    assert not names(node_own=wheelhouse["NODE_OWN"] + ("httpx",), also=("httpx",)) - runtime  # the node's
    with pytest.raises(ValueError, match="requestz is not in uv.lock"):
        names(also=("requestz",))
    with pytest.raises(ValueError, match="vae-mnist has no extra tests"):
        names(extras=("tests",))


@pytest.mark.integration  # pip download from the index
def test_the_build_tools_travel_with_what_they_need(tmp_path):
    """pip builds the source archive and the project on the node in an isolated environment,
    which installs setuptools and wheel from the wheelhouse alone, never from the node: what
    they require must be there too (wheel 0.48 requires packaging, which the node has and the
    isolated build cannot see)."""
    import sys

    from packaging.utils import canonicalize_name

    wheelhouse = runpy.run_path(str(INFRA / "wheelhouse.py"))
    listed = tmp_path / "build-requirements.txt"
    listed.write_text("\n".join(wheelhouse["build_requirements"]()) + "\n")
    # The Python this venv was made from has pip (uv's venvs have none), as the Makefile's PYTHON.
    assert wheelhouse["download"](sys._base_executable, "3.12", listed, tmp_path, deps=True) == 0
    target, wheels = wheelhouse["target_environment"]("3.12"), list(tmp_path.glob("*.whl"))
    needed = {canonicalize_name(r.name) for wheel in wheels for r in wheelhouse["requires_dist"](wheel)
              if not r.marker or r.marker.evaluate(target)}
    present = {canonicalize_name(wheel.name.split("-")[0]) for wheel in wheels}
    assert {"setuptools", "wheel", "packaging"} <= present and needed <= present


def test_the_node_venv_imports_its_own_packages_first_and_the_nodes_after(tmp_path):
    """infra/node_install.py's venv over a Python whose torch lives in a venv of its own (this
    test's .venv plays the GPU image's): torch still imports, from there, and the new venv's
    own packages come first. `venv --system-site-packages` would have lost torch here."""
    import json
    import subprocess
    import sysconfig

    python = runpy.run_path(str(INFRA / "node_install.py"))["layered_venv"](tmp_path / "venv")
    probe = ("import json, sys, sysconfig, torch; "
             "print(json.dumps([torch.__file__, sys.path, sysconfig.get_path('purelib')]))")
    torch_file, path, own = json.loads(subprocess.run([str(python), "-c", probe], check=True, capture_output=True,
                                                      text=True).stdout)
    node = sysconfig.get_path("purelib")  # this interpreter's site-packages: the node's
    assert Path(torch_file).is_relative_to(node)
    assert Path(own).is_relative_to(tmp_path) and path.index(own) < path.index(node)


@pytest.mark.integration  # pip download from the index
def test_node_install_installs_with_the_nodes_own_pip_from_the_wheelhouse_alone(tmp_path):
    """The GPU image's Python has pip (the rehearsals' stand-in had none, so ensurepip's way ran):
    node_install.py then has that pip install into the layered venv (`pip --python`), which gets
    no pip of its own, from the wheelhouse alone: here the project's build backend and itself."""
    import subprocess
    import sys

    node = tmp_path / "node"  # a Python with pip, as the image's /opt/torch/.venv
    subprocess.run([sys._base_executable, "-m", "venv", str(node)], check=True)
    wheelhouse = runpy.run_path(str(INFRA / "wheelhouse.py"))
    listed = tmp_path / "wheels" / "requirements.txt"
    listed.parent.mkdir()
    listed.write_text("\n".join(wheelhouse["build_requirements"]()) + "\n")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert wheelhouse["download"](sys._base_executable, version, listed, listed.parent, deps=True) == 0
    installed = subprocess.run([str(node / "bin/python"), str(INFRA / "node_install.py"), str(listed.parent),
                                str(tmp_path / "venv")], capture_output=True, text=True, env={
                                    **os.environ, "PIP_NO_INDEX": "1", "PIP_NO_CACHE_DIR": "1"})
    assert installed.returncode == 0, installed.stdout + installed.stderr
    probe = "import importlib.util as u, pipeline, setuptools; print(pipeline.__file__, setuptools.__file__, " \
            "u.find_spec('pip').origin, sep='\\n')"  # a line each: a path may have a space
    found = subprocess.run([str(tmp_path / "venv/bin/python"), "-c", probe], check=True, capture_output=True,
                           text=True).stdout.splitlines()
    assert Path(found[0]).is_relative_to(ROOT) and Path(found[1]).is_relative_to(tmp_path / "venv")
    assert Path(found[2]).is_relative_to(node)  # the node's pip, seen through the .pth: none installed


def test_the_wheelhouse_ships_the_locks_version_where_the_nodes_is_refused(tmp_path):
    """The node keeps its own version of a package only where every wheel accepts it: once its
    ml-dtypes 0.7.0 stopped tritonclient's wheel installing (ml-dtypes<=0.5.4). A requirement
    counts for the target Python and for the extras the lock asks of its package (ray's train)."""
    import zipfile

    wheelhouse = runpy.run_path(str(INFRA / "wheelhouse.py"))
    node = wheelhouse["node_versions"]("ml_dtypes==0.7.0\nnumpy==2.5.2\npandas==1.5.3\nscipy==1.16.0\nmlflow @ x\n")
    assert node == {"ml-dtypes": "0.7.0", "numpy": "2.5.2", "pandas": "1.5.3", "scipy": "1.16.0"}
    wheel = tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("ray-2.60.0.dist-info/METADATA", "\n".join([
            "Metadata-Version: 2.1", "Name: ray", "Version: 2.60.0",
            "Requires-Dist: ml-dtypes<=0.5.4",                          # refuses the node's
            'Requires-Dist: numpy<2; python_version < "3.12"',          # not for a 3.12 node
            'Requires-Dist: pandas>=2; extra == "train"',               # an extra the lock asks for
            'Requires-Dist: scipy<1; extra == "rllib"']) + "\n")        # one it does not
    refused = wheelhouse["refused"]([wheel], node, "3.12")
    assert set(refused) == {"ml-dtypes", "pandas"} and "ray's ml-dtypes<=0.5.4" in refused["ml-dtypes"]
