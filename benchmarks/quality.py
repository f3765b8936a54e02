"""Model quality beside its targets and the published figures, in nats per test image.

Reads finished pipeline runs: each WORKSPACE is a folder where `dvc repro` (or `dvc exp
run` then `dvc exp apply`) has written metrics/eval.json and plots/train.csv, with the
params.yaml they came from. Grey-level runs (data.binarize: none) are set against the
default-params target and the two references; dynamically binarised runs against the
paper target and the literature.

    python benchmarks/quality.py [WORKSPACE ...]      # default: the current folder
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml

# The model-quality issue's targets, and the figures it compares them with.
GREY = {"target": 100.0, "minutes": 10, "metric": "neg_elbo",
        "references": {"PyTorch VAE example, 784-400-20, 10 epochs (measured here)": 105.55,
                       "seed notebook model, 400-400-200, 10 epochs (measured here)": 103.82}}
PAPER = {"target": 84.5, "minutes": 60, "metric": "nll_iwae", "iwae_k": 5000, "test_images": 10_000,
         "references": {"Burda et al. 2015, VAE, 1 stochastic layer": 86.76,
                        "Burda et al. 2015, IWAE k=50, 1 stochastic layer": 84.78,
                        "Burda et al. 2015, IWAE k=50, 2 stochastic layers": 82.90,
                        "NVAE (Vahdat and Kautz 2020)": 78.01}}
# The quality moonshot (beat the two-layer IWAE within the hour): its milestone, then its target.
MOONSHOT_REFERENCES = {"this project's paper preset, 1 layer, 250 epochs (measured here)": 84.28,
                       "Burda et al. 2015, IWAE k=50, 2 stochastic layers": 82.90,
                       "Ladder VAE (Sonderby et al. 2016), as the issue quotes it": 81.74,
                       "this project's 1-layer VampPrior, 250 epochs (measured)": 82.53,
                       "Tomczak & Welling 2018, HVAE + VampPrior, as quoted": 81.2}
MILESTONE = PAPER | {"target": 83.5, "references": MOONSHOT_REFERENCES}
MOONSHOT = PAPER | {"target": 82.9, "references": MOONSHOT_REFERENCES}


def read_run(workspace: Path) -> dict:
    params = yaml.safe_load((workspace / "params.yaml").read_text()) or {}
    evaluation = json.loads((workspace / "metrics" / "eval.json").read_text())
    with open(workspace / "plots" / "train.csv", newline="") as f:
        epochs = list(csv.DictReader(f))
    return {"workspace": workspace, "binarize": params.get("data", {}).get("binarize", "none"),
            "eval": evaluation, "epochs": len(epochs),
            "train_minutes": sum(float(row["epoch_seconds"]) for row in epochs) / 60}


def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


def report(title: str, spec: dict, runs: list[dict]) -> list[str]:
    metric = spec["metric"]
    lines = [f"\n{title}: {metric} <= {spec['target']}, training <= {spec['minutes']} min"]
    for run in runs:
        ev = run["eval"]
        # The paper figure counts only with its protocol: L_5000 over the whole test set.
        protocol = all(ev.get(key) == spec[key] for key in ("iwae_k", "test_images") if key in spec)
        ok = protocol and ev[metric] <= spec["target"] and run["train_minutes"] <= spec["minutes"]
        lines.append(f"  {str(run['workspace']):66}{ev[metric]:8.2f}   ({metric}; -ELBO {ev['neg_elbo']:.2f}, "
                     f"IWAE k={ev['iwae_k']} on {ev['test_images']} images: {ev['nll_iwae']:.2f}; "
                     f"{run['epochs']} epochs in {run['train_minutes']:.1f} min)  {verdict(ok)}")
    lines += [f"  {name:66}{value:8.2f}" for name, value in spec["references"].items()]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workspaces", nargs="*", type=Path, default=[Path(".")])
    runs = [read_run(w) for w in parser.parse_args().workspaces]
    grey = [r for r in runs if r["binarize"] == "none"]
    binary = [r for r in runs if r["binarize"] == "dynamic"]
    lines = ["model quality, nats per test image (lower is better)"]
    if grey:
        lines += report("default params, grey levels", GREY, grey)
    if binary:
        lines += report("paper protocol, dynamically binarised MNIST", PAPER, binary)
        lines += report("the moonshot's milestone", MILESTONE, binary)
        lines += report("the moonshot: beat the two-layer IWAE", MOONSHOT, binary)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
