"""The `vae` command: one subcommand per pipeline stage (as dvc.yaml runs them), plus `serve`,
`encode` and `sample` (the exported graphs over HTTP, or over files)."""
from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import importlib.metadata
import logging
import math
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

from pipeline.files import CACHE_DIR, NO_ROOM, Layout, no_room
from pipeline.tracking import hide_credentials

STAGES = {
    "fetch": "download MNIST and check it byte for byte",
    "train": "train the VAE under Ray Train",
    "evaluate": "test-set ELBO terms, IWAE log-likelihood, image grids",
    "export": "export the decoder to ONNX and check parity with onnxruntime",
    "summary": "where the results are and how to browse them",
}


def version() -> str:
    from pipeline import environment

    return f"{environment.PROJECT} {environment.project_version()} (uv.lock sha256 " \
           f"{environment.lock_sha256()})"


def within(kind: type, low: float, high: float = math.inf):
    """An argparse type: a finite number of `kind` from low to high. Left unchecked, uvicorn
    reported port 70000 and bound another, and Ray Serve met --replicas 0 with a traceback."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (math.isfinite(value) and low <= value <= high):
            bounds = f"{low} to {high}" if high < math.inf else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, not {text}")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    # Raw: the version line stays one line.
    p = argparse.ArgumentParser(prog="vae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=version())
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in STAGES.items():
        sub.add_parser(name, help=help_text)
    sub.add_parser("env", help="the project version, uv.lock's hash, whether the environment matches it, the devices")
    sweep = sub.add_parser("sweep", help="run the queued experiments (`dvc exp run --queue`), N at a time")
    sweep.add_argument("-j", "--jobs", type=within(int, 1), default=1, help="experiments at once (default: 1)")
    serve = sub.add_parser("serve", help="serve the exported graphs over HTTP with onnxruntime")
    serve.add_argument("model", help="the export stage's folder (models/: decoder, encoder and score), a "
                                     "decoder file, or a registry URI (models:/vae-decoder@champion)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=within(int, 1, 65535), default=8000)
    serve.add_argument("--max-batch", type=within(int, 1), default=1024,
                       help="largest batch of latent vectors or images per request")
    serve.add_argument("--ray", action="store_true", help="deploy on Ray Serve ($RAY_ADDRESS, else a local Ray)")
    serve.add_argument("--replicas", type=within(int, 1), default=2, help="with --ray: replicas, each its own session")
    serve.add_argument("--replica-cpus", type=within(float, 0), default=1.0,
                       help="with --ray: CPUs reserved per replica")
    batch_parsers(sub)
    return p


def batch_parsers(sub: argparse._SubParsersAction) -> None:
    """`vae encode` and `vae sample` (pipeline/batch.py)."""
    model_help = "the export stage's folder, a decoder file, or a registry URI (default: the project's models/)"
    enc = sub.add_parser("encode", help="latent means and scores of image files (IDX, .npy, PNG), via onnxruntime")
    enc.add_argument("inputs", nargs="+", type=Path, help="IDX image files, .npy arrays or PNG images")
    enc.add_argument("--out", type=Path, required=True, help="latents.npy or latents.csv")
    enc.add_argument("--model", help=model_help)
    seed, batch = within(int, 0, 2**32 - 1), within(int, 1)  # a seed as the server takes it
    enc.add_argument("--seed", type=seed, default=0, help="the scores' noise, as /v1/score?seed= (default: 0)")
    enc.add_argument("--batch-size", type=batch, default=1024)
    smp = sub.add_parser("sample", help="digits decoded from prior samples: a PNG grid or .npy, via onnxruntime")
    smp.add_argument("--n", type=within(int, 1), default=64, help="how many (default: 64)")
    smp.add_argument("--seed", type=seed, default=0, help="as /v1/samples.png?seed= (default: 0)")
    smp.add_argument("--out", type=Path, required=True, help="samples.png (a grid) or samples.npy")
    smp.add_argument("--model", help=model_help)
    smp.add_argument("--batch-size", type=batch, default=1024)


def stop(signum: int, frame) -> None:
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """SIGTERM (`kill`, a container's stop, a cancelled CI job) and SIGHUP (the terminal closed)
    end a command as Ctrl-C does: its cleanup runs (temporary files removed, the MLflow run
    marked KILLED, not left RUNNING), then one line. A signal the parent ignores (`nohup`
    ignores SIGHUP) stays ignored; any other handler gives way (Ray's and Ray Train's, in a
    process that already joined Ray: they exit from inside `ray.get` in no words). Ctrl-C's
    SIGINT gets the same handler, Python's own in effect."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, stop)


# The errors a user can put right, each said in one line, not a traceback. Looked up among the modules
# imported by then (one that is not cannot have raised its error), so that a command imports only what it
# runs: `vae serve` and `vae --version` do not import torch for the sake of these (3 s of CPU).
USER_ERRORS = (("pipeline.params", "ParamsError"), ("vae.data", "DataError"), ("vae.model", "ModelFileError"),
               ("pipeline.registry", "GraphError"), ("pipeline.files", "StageFileError"),
               ("pipeline.files", "OutputError"), ("pipeline.train_worker", "CheckpointError"),
               ("pipeline.export", "ExportError"), ("pipeline.sweep", "SweepError"),
               ("pipeline.ray_connect", "PlacementError"))


def user_error(e: Exception) -> bool:
    return isinstance(e, (FileNotFoundError, LookupError, ConnectionError)) or any(
        isinstance(e, getattr(sys.modules.get(module), name, ())) for module, name in USER_ERRORS)


def out_of_room(e: Exception, args: argparse.Namespace) -> str | None:
    """A full disk or quota in a line, with the free space where the command writes, not a
    traceback. Its outputs are written whole or not at all (pipeline/files.py)."""
    if not (isinstance(e, OSError) and e.errno in NO_ROOM):
        return None
    out = getattr(args, "out", None)  # vae encode, vae sample
    return no_room(e, *Layout().folders(), *([out.parent] if out else []), CACHE_DIR, tempfile.gettempdir())


INTERRUPTED_HINTS = {"sweep": "the queue's workers go on: `dvc queue status`; `dvc queue stop --kill` stops them"}


def main(argv: list[str] | None = None) -> int:
    # As the process exits, Python collects the garbage among every object still alive:
    # millions, after torch, MLflow and sympy are imported, which took 6.6 s of `vae evaluate`'s
    # exit here. Frozen objects are exempt (0.6 s); our files and connections are closed by then.
    atexit.register(gc.freeze)
    args = parser().parse_args(argv)
    # MLflow configures its own loggers at INFO when imported ("Creating initial MLflow database
    # tables", system metrics started and stopped): warnings only, unless the user asks for more.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the summary names the run once
    # Our own modules at INFO; libraries (onnxscript's optimiser, MLflow, ...) only warn.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    stop_on_signals()
    try:
        if args.command == "serve" and args.ray:
            from pipeline.serve import ray_serve

            ray_serve.run(args.model, args.host, args.port, args.max_batch, args.replicas, args.replica_cpus)
        elif args.command == "serve":
            from pipeline.serve import app

            app.run(args.model, host=args.host, port=args.port, max_batch=args.max_batch)
        elif args.command in ("encode", "sample"):
            from pipeline import batch

            batch.main(args)
        elif args.command == "sweep":
            from pipeline import sweep

            return sweep.run(args.jobs)
        elif args.command == "env":
            from pipeline import environment

            print(environment.describe())
        else:
            importlib.import_module(f"pipeline.{args.command}").main()
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM or SIGHUP: say so in a line, not a traceback
        hint = str(e) or INTERRUPTED_HINTS.get(args.command)
        print(f"vae {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except Exception as e:
        room = out_of_room(e, args)
        if room:
            print(f"vae {args.command}: error: {room}", file=sys.stderr)
            return 2
        if user_error(e):  # MLflow's errors name the URL they asked, with any password the tracking URI carries
            print(hide_credentials(f"vae {args.command}: error: {e}"), file=sys.stderr)
            return 2
        # Not one of the errors above: the traceback a bug report needs, password hidden.
        print(hide_credentials(traceback.format_exc()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
