"""The pipeline's stages on this machine, each timed, as the GPU issue asks of a GPU node:
`vae fetch` from a local copy of MNIST, `vae train` under a local Ray (GPU workers where there
is a GPU: `train.use_gpu: auto`) killed once its first checkpoint exists and run again to
resume (where that makes no model, once more with `train.cuda_graph: false`: a step that
would not capture costs its rows, not the stages after it), `vae evaluate`, `vae export`, the
trained model loaded on the CPU alone, `vae serve` beside the same with every GPU hidden (the
CPU provider alone), and `vae serve --ray` (one Ray Serve replica, a GPU share where there is
a GPU) under load (their providers, answers per second and latency at batches 1, 64 and
1,024; the first two's ratios), and `dvc repro` twice in a fresh git repository where DVC and
git are installed. benchmarks/gpu_check.py is the GPU table; this is the pipeline around it.

    python benchmarks/gpu_pipeline.py --data DIR [--params small.yaml] [--out DIR]

--data is a folder with the four MNIST IDX files; --params a YAML whose sections are merged
over params.yaml (a CPU's smoke run: few epochs and images). Each stage's output goes into
--out/<stage>.log, the table to the terminal and --out/summary.txt. It carries on past a
failed stage and exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infra" / "local"))
import stack  # noqa: E402  (start and stop processes with all they spawn, free ports)

from pipeline.registry import MODEL_NAME  # noqa: E402

BIN = Path(sys.executable).parent
# What a copy of the project needs to run its pipeline (as tests/helpers.py's PROJECT_FILES).
PROJECT_FILES = ["vae", "pipeline", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore"]


class Stages:
    """Runs commands in one project folder, each logged into out/<name>.log and timed."""

    def __init__(self, project: Path, out: Path, env: dict[str, str]):
        self.project, self.out, self.env, self.rows = project, out, env, []

    def row(self, name: str, seconds: float, result: str) -> None:
        self.rows.append((name, seconds, result))
        print(f"{name:<28} {seconds:8.1f} s  {result}", flush=True)

    def run(self, name: str, *cmd: str, env: dict[str, str] | None = None) -> str | None:
        """The command's output, or None (recorded as failed) if it exited non-zero."""
        start = time.monotonic()
        result = subprocess.run(cmd, cwd=self.project, env=env or self.env, capture_output=True, text=True)
        output = result.stdout + result.stderr
        (self.out / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{output}")
        last = output.strip().splitlines()[-1] if output.strip() else ""
        self.row(name, time.monotonic() - start, "ok" if result.returncode == 0 else
                 f"FAILED (exit {result.returncode}): {last}")
        return output if result.returncode == 0 else None

    @property
    def failed(self) -> bool:
        return any(r[2].startswith("FAILED") for r in self.rows)


def project_copy(target: Path, data: Path, overrides: dict) -> Path:
    """The project's files in a fresh git repository, params.yaml with the overrides merged
    and MNIST read from `data` (`data.source`: a local folder, checked byte for byte)."""
    for name in PROJECT_FILES:
        source, dest = ROOT / name, target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, dest)
    write_params(target, data, overrides)
    if not shutil.which("git"):  # the stages need no repository, dvc repro does: skipped without git
        return target
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "gpu_pipeline"]):
        subprocess.run(cmd, cwd=target, check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "gpu", "GIT_AUTHOR_EMAIL": "gpu@localhost",
                            "GIT_COMMITTER_NAME": "gpu", "GIT_COMMITTER_EMAIL": "gpu@localhost"})
    return target


def write_params(target: Path, data: Path, overrides: dict) -> None:
    """The project's params.yaml with the overrides merged, MNIST read from `data`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in {**overrides, "data": {**overrides.get("data", {}), "source": str(data)}}.items():
        params[section] = {**params[section], **values}
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def eager_if_training_failed(stages: Stages, data: Path, overrides: dict) -> dict:
    """Where training made no model (a step that would not capture as a CUDA graph, say), once
    more with train.cuda_graph: false, so that the stages after it still run and are measured.
    Returns the overrides that made the model."""
    if (stages.project / "models/vae.pt").exists():
        return overrides
    eager = {**overrides, "train": {**overrides.get("train", {}), "cuda_graph": False}}
    write_params(stages.project, data, eager)
    stages.run("train, eager", str(BIN / "vae"), "train")
    return eager


def train_killed_then_resumed(stages: Stages) -> None:
    """`vae train` SIGKILLed with everything it started (its local Ray too) once the first
    checkpoint is written, then run again: the rerun must not train epoch 1 again."""
    log = stages.out / "train-killed.log"
    start = time.monotonic()
    train = stack.start([str(BIN / "vae"), "train"], log, stages.env, stages.project)
    # Ray's record of the checkpoint (written after its files) is what a rerun resumes from.
    while not list((stages.project / ".ray_results").rglob("checkpoint_manager_snapshot.json")):
        if train.poll() is not None:  # failed, or (a fast GPU, few epochs) done before the poll saw it
            stages.row("train, killed", time.monotonic() - start, f"FAILED: exited {train.returncode} before it "
                       f"could be killed ({log.name})")
            return
        time.sleep(0.05)
    stack.stop(train, first=signal.SIGKILL, timeout_s=0)  # all it started, at once
    stages.row("train, killed", time.monotonic() - start, "killed after the first checkpoint")
    resumed = stages.run("train, resumed", str(BIN / "vae"), "train")
    if resumed is not None and ("epoch   1/" in resumed or "best epoch" not in resumed):
        stages.row("train, resumed", 0, "FAILED: trained epoch 1 again instead of resuming")
    elif resumed is not None:
        metrics = json.loads((stages.project / "metrics/train.json").read_text())
        stages.row("  its device, epoch", 0, f"{metrics['device']}, {metrics['epoch_seconds']:.3f} s an epoch")


LOAD_ON_CPU = """
import torch
from vae.model import VAE, VAEConfig
assert not torch.cuda.is_available()
saved = torch.load("models/vae.pt", weights_only=True)
model = VAE(VAEConfig(**saved["config"]))
model.load_state_dict(saved["state_dict"])
images = model.decode(torch.zeros(2, model.config.latent_dim))
print("loaded on", next(model.parameters()).device, "decoded", tuple(images.shape))
"""


BATCHES = (1, 64, 1024)  # the load's batch sizes


def served(stages: Stages, label: str, options: list[str], seconds: float, clients: int,
           env: dict[str, str] | None = None) -> dict[int, dict]:
    """`vae serve models OPTIONS` on a free port: the decoder's providers, then /v1/decode flat
    out from `clients` threads for `seconds` at each batch size; then stopped, all it started.
    Returns each batch size's figures (see _load) that came back."""
    port, log = stack.free_port(), stages.out / f"{label}.log"
    server = stack.start([str(BIN / "vae"), "serve", "models", "--port", str(port), *options], log,
                         env or stages.env, stages.project)
    url, start, figures = f"http://127.0.0.1:{port}", time.monotonic(), {}
    try:
        while not stack.http_ok(f"{url}/v2/health/ready"):
            if server.poll() is not None or time.monotonic() - start > 180:
                stages.row(label, time.monotonic() - start, f"FAILED: did not start ({log.name})")
                return figures
            time.sleep(0.2)
        parameters = httpx.get(f"{url}/v2/models/{MODEL_NAME}").json()["parameters"]
        stages.row(f"{label}, started", time.monotonic() - start, f"providers {parameters['providers']}, "
                   f"CPU below batch {parameters['cpu_below_batch']}")
        latent = yaml.safe_load((stages.project / "params.yaml").read_text())["model"]["latent_dim"]
        for batch in BATCHES:
            result = _load(f"{url}/v1/decode", batch, latent, seconds, clients)
            if result.get("rps"):
                figures[batch] = result
            stages.row(f"{label}, batch {batch}", seconds, _described(result, batch))
    finally:
        stack.stop(server, first=signal.SIGINT)  # and a local Ray it started
    return figures


def against_cpu(stages: Stages, figures: dict[int, dict], cpu: dict[int, dict]) -> None:
    """`vae serve` as it runs here against the same on the CPU provider alone, batch by batch."""
    for batch in sorted(figures.keys() & cpu.keys()):
        ours, theirs = figures[batch], cpu[batch]
        stages.row(f"  batch {batch}: vs CPU alone", 0, f"{ours['rps'] / theirs['rps']:.2f}x the answers per "
                   f"second, p50 {ours['p50']:.1f} vs {theirs['p50']:.1f} ms")


def _described(result: dict, batch: int) -> str:
    if not result.get("rps"):
        return f"FAILED: {result['errors']} errors, no answer"
    return (f"{result['rps']:,.0f} req/s, {result['rps'] * batch:,.0f} img/s, p50 {result['p50']:.1f} ms, "
            f"p99 {result['p99']:.1f} ms, {result['errors']} errors")


def _load(url: str, batch: int, latent: int, seconds: float, clients: int) -> dict:
    """/v1/decode flat out: answers per second, p50 and p99 latency (ms) and errors."""
    body = {"z": [[0.1 * ((i + j) % 7 - 3) for j in range(latent)] for i in range(batch)]}
    latencies, errors, stop = [], [], time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < stop:
                sent = time.perf_counter()
                response = http.post(url, json=body)
                (latencies if response.status_code == 200 else errors).append(time.perf_counter() - sent)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not latencies:
        return {"errors": len(errors)}
    ms = sorted(1e3 * s for s in latencies)
    return {"rps": len(ms) / seconds, "p50": statistics.median(ms), "p99": ms[int(0.99 * (len(ms) - 1))],
            "errors": len(errors)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a folder with the four MNIST IDX files")
    p.add_argument("--params", type=Path, help="YAML sections merged over params.yaml")
    p.add_argument("--out", type=Path, default=Path("gpu_pipeline_out"), help="logs and summary.txt")
    p.add_argument("--seconds", type=float, default=5, help="load per batch size on `vae serve`")
    p.add_argument("--clients", type=int, default=8, help="concurrent connections of the load")
    args = p.parse_args()
    overrides = yaml.safe_load(args.params.read_text()) if args.params else {}
    args.out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    with tempfile.TemporaryDirectory(prefix="gpu-pipeline-") as tmp:
        stages = Stages(project_copy(Path(tmp) / "project", args.data.resolve(), overrides), args.out.resolve(), env)
        stages.run("env", str(BIN / "vae"), "env")
        if stages.run("fetch", str(BIN / "vae"), "fetch") is not None:
            train_killed_then_resumed(stages)
            overrides = eager_if_training_failed(stages, args.data.resolve(), overrides)
        stages.run("evaluate", str(BIN / "vae"), "evaluate")
        stages.run("export", str(BIN / "vae"), "export")
        stages.run("model on the CPU alone", sys.executable, "-c", LOAD_ON_CPU, env={**env, "CUDA_VISIBLE_DEVICES": ""})
        figures = served(stages, "serve", [], args.seconds, args.clients)
        # The reference, side by side: the same server with every GPU hidden, on the CPU provider.
        cpu = served(stages, "serve, CPU alone", [], args.seconds, args.clients, {**env, "CUDA_VISIBLE_DEVICES": ""})
        against_cpu(stages, figures, cpu)
        served(stages, "serve --ray", ["--ray", "--replicas", "1"], args.seconds, args.clients)
        if not (shutil.which("dvc", path=env["PATH"]) and shutil.which("git")):
            stages.row("dvc repro", 0, "skipped: no dvc or no git here")
        else:
            # The stages above ran outside DVC: a repository of its own for dvc repro.
            dvc = Stages(project_copy(Path(tmp) / "dvc", args.data.resolve(), overrides), stages.out, env)
            dvc.rows = stages.rows  # one table
            dvc.run("dvc repro", "dvc", "repro")
            again = dvc.run("dvc repro, again", "dvc", "repro")
            if again is not None and "didn't change" not in again:
                dvc.row("dvc repro, again", 0, "FAILED: ran stages again")
    summary = "\n".join(f"{name:<28} {seconds:8.1f} s  {result}" for name, seconds, result in stages.rows)
    (args.out / "summary.txt").write_text(summary + "\n")
    return 1 if stages.failed else 0


if __name__ == "__main__":
    sys.exit(main())
