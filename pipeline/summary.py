"""`vae summary`: where the pipeline's results are, and how to browse them."""
from __future__ import annotations

import os

from pipeline import tracking
from pipeline.files import RUN_IN_PROJECT, Layout, read_json


def _read(path, *keys: str) -> dict:
    return read_json(path, *keys) if path.is_file() else {}


def _shown(path) -> str:
    """path as the user may type it where they are: relative to the working directory, which
    may be the project or a folder inside it (as git status shows paths)."""
    return os.path.relpath(path)


def summary(layout: Layout) -> str:
    ev = _read(layout.eval_metrics, "neg_elbo", "recon", "kl", "iwae_k", "nll_iwae")
    run = _read(layout.mlflow_run, "run_id", "experiment")
    if not (ev or run or layout.model.exists()):
        return f"\nResults: none yet in {layout.root}; `make repro` (or `dvc repro`) runs the pipeline"
    lines = ["", "Results:"]
    if ev:
        lines.append(f"  test -ELBO {ev['neg_elbo']:.2f} nats/image (recon {ev['recon']:.2f}, KL {ev['kl']:.2f}); "
                     f"IWAE k={ev['iwae_k']} NLL {ev['nll_iwae']:.2f}")
    for label, path in [("model", layout.model), ("ONNX decoder", layout.decoder_onnx),
                        ("metrics", layout.root / "metrics"), ("plots", layout.root / "plots")]:
        if path.exists():
            lines.append(f"  {label + ':':14}{_shown(path)}")
    if run:
        lines.append(f"  {'MLflow run:':14}{run['run_id']} (experiment {run['experiment']})")
    lines += ["Browse the run:", f"  {tracking.browse_hint(layout)}"]
    if layout.decoder_onnx.exists():
        lines += ["Serve the model (decoder, encoder, score):",
                  f"  vae serve {_shown(layout.decoder_onnx.parent)}/"]
    return "\n".join(lines)


def main() -> None:
    layout = Layout()
    if not (layout.root / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{layout.root}: no project here; {RUN_IN_PROJECT}")
    print(summary(layout), flush=True)
