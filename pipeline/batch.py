"""`vae encode` and `vae sample`: the served graphs over files, through onnxruntime, no server.

    vae encode data/mnist/t10k-images-idx3-ubyte --out latents.csv     # IDX, .npy or PNG files in
    vae sample --n 64 --seed 7 --out samples.png                       # a PNG grid, or .npy images

Each image's latent mean and score are what `vae serve` answers for it: the same graphs, the
same checks, and the score's noise drawn from --seed as the server draws it for one request
holding every input image in order (so image i's score does not depend on --batch-size). A
sample grid is the server's /v1/samples.png for the same n and seed, byte for byte.
Outputs are written whole or not at all.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.files import Layout, atomic_path, write_serialised
from pipeline.registry import ENCODER_NAME, MODEL_NAME, SCORE_NAME, resolve
from pipeline.serve.protocol import ApiError, check_batch, png_image
from pipeline.serve.session import IMAGE_PIXELS, OnnxModel, open_models, score_noise
from vae.data import DataError, read_idx

OUTPUTS = (".npy", ".csv")


class InputError(DataError):
    """An input file that holds no images the model takes, or an output that cannot be written."""


def read_images(path: Path, model: OnnxModel) -> tuple[np.ndarray, list[str]]:
    """One file's images, (N, 784) grey levels in [0, 1], checked as the server checks them, and
    a note for each PNG converted to 28x28 grey. IDX and .npy hold uint8 (0-255) or, for .npy,
    floats in [0, 1]; shaped (N, 28, 28) or (N, 784)."""
    notes = []
    if path.is_dir():
        raise InputError(f"{path}: a folder; image files are read (IDX, .npy or PNG)")
    try:
        if path.suffix.lower() == ".png":
            x, note = png_image(path.read_bytes(), model, what="the file", hint="")
            notes += [f"{path}: {note}"] if note else []
            return x, notes
        array = np.load(path, allow_pickle=False) if path.suffix.lower() == ".npy" else read_idx(path)
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255
        elif not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"{path}: {array.dtype} values; uint8 (0-255) or floats in [0, 1] expected")
        x = array.reshape(len(array), -1).astype(np.float32) if array.ndim in (2, 3) else array
        if x.ndim != 2 or x.shape[1] != IMAGE_PIXELS:
            raise InputError(f"{path}: shape {list(array.shape)}; images (N, 28, 28) or (N, 784) expected")
        return x, notes
    except ApiError as e:
        raise InputError(f"{path}: {e.message}") from None
    except DataError:  # a bad IDX file: its message names the file
        raise
    except (OSError, ValueError) as e:  # unreadable, or a .npy that is not one
        raise InputError(f"{path}: {e}") from None


def check_each(x: np.ndarray, path: Path, model: OnnxModel, batch: int) -> None:
    """The server's checks (finite, in [0, 1]) on every batch of a file, naming the file."""
    for start in range(0, len(x), batch):
        try:
            check_batch(x[start:start + batch], model)
        except ApiError as e:
            raise InputError(f"{path}, images {start} to {min(start + batch, len(x)) - 1}: {e.message}") from None


def encode(paths: list[Path], source: str, out: Path, seed: int, batch: int) -> int:
    """Latent means and scores of every image in `paths`, written to `out` (.npy or .csv)."""
    if out.suffix not in OUTPUTS:
        raise InputError(f"{out}: the output is .npy or .csv")
    models = open_models(resolve(source), batch)
    if ENCODER_NAME not in models or SCORE_NAME not in models:
        raise InputError(f"{source}: no encoder or score graph beside the decoder (use the export stage's "
                         f"folder, models/, or a registered model)")
    encoder, scorer = models[ENCODER_NAME], models[SCORE_NAME]
    images, sources = [], []
    for path in paths:
        x, notes = read_images(path, encoder)
        check_each(x, path, encoder, batch)
        for note in notes:
            print(f"encode: {note}", flush=True)
        images.append(x)
        sources += [f"{path}:{i}" for i in range(len(x))]
    x = np.concatenate(images)
    noise, mu, scores = score_noise(seed), [], []
    with tqdm(total=len(x), desc="encode", unit="image", disable=len(x) <= batch) as bar:
        for start in range(0, len(x), batch):
            rows = x[start:start + batch]
            mu.append(encoder.encode(rows)[0])
            scores.append(scorer.score(rows, noise))  # the next rows' noise, as one request's would be
            bar.update(len(rows))
    write_table(out, np.concatenate(mu), np.concatenate(scores), sources)
    print(f"encode: {len(x)} image{'s' * (len(x) != 1)} -> {out} (latent means of {mu[0].shape[1]} dimensions "
          f"and -L_{scorer.k} scores in nats, seed {seed})", flush=True)
    return len(x)


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to exactly this path (given a name, np.save appends .npy to a temporary one)."""
    write_serialised(path, lambda f: np.save(f, array))


def write_table(out: Path, mu: np.ndarray, scores: np.ndarray, sources: list[str]) -> None:
    """.npy: float32 (N, latent_dim + 1), the latent mean then the score; .csv: the same with
    a header and each image's file:index first."""
    with atomic_path(out) as tmp:
        if out.suffix == ".npy":
            save_npy(tmp, np.column_stack([mu, scores]).astype(np.float32))
            return
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", *(f"mu_{i}" for i in range(mu.shape[1])), "score"])
            for source, row, score in zip(sources, mu, scores):
                writer.writerow([source, *(f"{v:.7g}" for v in row), f"{score:.7g}"])


def sample(source: str, n: int, seed: int, out: Path, batch: int) -> None:
    """n images decoded from prior samples (seed as /v1/samples.png draws them): a PNG grid or
    .npy probabilities (n, 1, 28, 28)."""
    from pipeline.serve.app import png_grid

    if out.suffix not in (".png", ".npy"):
        raise InputError(f"{out}: the output is .png (a grid) or .npy")
    decoder = open_models(resolve(source), batch)[MODEL_NAME]
    z = decoder.prior_samples(n, seed)
    images = []
    for start in tqdm(range(0, n, batch), desc="sample", unit="batch", disable=n <= batch):
        images.append(decoder.decode(z[start:start + batch]))
    images = np.concatenate(images)
    with atomic_path(out) as tmp:
        if out.suffix == ".png":
            tmp.write_bytes(png_grid(images))
        else:
            save_npy(tmp, images)
    print(f"sample: {n} images (seed {seed}) -> {out}", flush=True)


def main(args: argparse.Namespace) -> None:
    """`vae encode` or `vae sample`, their numbers checked by pipeline/cli.py's parser. The
    model by default: the project's models/, from wherever in the project the user is."""
    model = args.model or f"{Layout().decoder_onnx.parent}/"
    if args.command == "encode":
        encode(args.inputs, model, args.out, args.seed, args.batch_size)
    else:
        sample(model, args.n, args.seed, args.out, args.batch_size)
