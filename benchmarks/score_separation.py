"""How well the served score tells MNIST's test digits from obvious outliers: AUROC, side by side.

The score is -L_k per image (models/score.onnx, k = export.score_k), run through `vae encode`'s
path (the served graphs on onnxruntime, noise from --seed). Outlier sets made from the same
test images, so only what makes them unlike digits differs:
  inverted    1 - x: dark digits on white
  shuffled    each image's pixels permuted (the same grey levels, no strokes)
  noise       uniform grey levels, as many images
AUROC is the chance that an outlier scores worse (higher) than a test digit, ties counted half
(the Mann-Whitney statistic): 1.0 separates them perfectly, 0.5 is chance. Also the training
images' scores against the test digits' (a model that has not overfitted: about 0.5).

Run from a repository where `make repro` has run (models/, data/mnist/):

    python benchmarks/score_separation.py [--images 2000] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.files import Layout
from pipeline.registry import SCORE_NAME, resolve
from pipeline.serve.session import open_models, score_noise
from vae.data import read_idx


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """P(an outlier scores higher than an inlier), ties half: for each outlier, the inliers
    below it plus those below or equal, halved (the Mann-Whitney U over the pairs)."""
    inliers = np.sort(inliers)
    below = np.searchsorted(inliers, outliers, side="left") + np.searchsorted(inliers, outliers, side="right")
    return float(below.sum() / 2 / (len(inliers) * len(outliers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="test images (and as many of each outlier set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="models/", help="the export stage's folder or a models:/ URI")
    args = parser.parse_args()
    layout, rng = Layout(), np.random.default_rng(args.seed)
    scorer = open_models(resolve(args.model), 1024)[SCORE_NAME]
    test = read_idx(layout.data_dir / "t10k-images-idx3-ubyte")[:args.images].reshape(-1, 784) / np.float32(255)
    train = read_idx(layout.data_dir / "train-images-idx3-ubyte")[:args.images].reshape(-1, 784) / np.float32(255)
    sets = {"test digits": test, "training digits": train, "inverted": 1 - test,
            "shuffled": rng.permuted(test, axis=1), "noise": rng.random(test.shape, dtype=np.float32)}
    start, scores = time.perf_counter(), {}
    for name, x in sets.items():
        noise = score_noise(args.seed)  # every set gets the same noise, row for row, as the server draws it
        scores[name] = np.concatenate([scorer.score(x[i:i + 1024], noise) for i in range(0, len(x), 1024)])
    seconds = time.perf_counter() - start
    print(f"-L_{scorer.k} per image in nats, {args.images} images a set ({seconds:.1f} s to score "
          f"{len(sets) * args.images} on {scorer.sessions.describe()['providers'][0]})")
    print(f"{'':18}{'mean':>10}{'median':>10}{'AUROC vs test digits':>24}")
    for name, s in scores.items():
        versus = "" if name == "test digits" else f"{auroc(scores['test digits'], s):>24.4f}"
        print(f"{name:18}{s.mean():>10.1f}{np.median(s):>10.1f}{versus}")


if __name__ == "__main__":
    main()
