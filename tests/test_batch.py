"""`vae encode` and `vae sample` on a small VAE's exported graphs, checked against the VAE
itself in torch with the noise the command documents: run as commands, and their refusals of
bad input through the CLI's main in this process (the command's start-up, 4 s, once a case)."""
import csv
import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import cli
from pipeline.export import export_decoder, export_encoder, export_score
from pipeline.serve.app import png_grid
from vae.data import encode_idx, read_idx
from vae.model import VAE, ImageDecoder, ImageEncoder, ImageScore, VAEConfig

from helpers import ROOT, run, small_filesystem

LATENT, K = 3, 4


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The export stage's folder for a small random VAE, and the VAE."""
    torch.manual_seed(1)
    model = VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(32,))).eval()
    folder = tmp_path_factory.mktemp("graphs")
    export_decoder(ImageDecoder(model), LATENT, folder / "decoder.onnx", opset=18)
    export_encoder(model, folder / "encoder.onnx", opset=18)
    export_score(model, K, folder / "score.onnx", opset=18)
    return folder, model


def vae(*args):
    return run([str(ROOT / ".venv/bin/vae"), *map(str, args)], ROOT)


def refused(capsys, *args) -> str:
    """`vae ARGS` run in this process, which must exit 2: what it wrote to stderr."""
    assert cli.main(list(map(str, args))) == 2
    return capsys.readouterr().err


def expected(model: VAE, x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The latent means, and the scores with every image's noise from one draw of `seed`'s
    numpy generator, as one server request of all the images would get."""
    eps = np.random.default_rng(seed).standard_normal((len(x), K, model.config.noise_dim), dtype=np.float32)
    with torch.no_grad():
        mu = ImageEncoder(model)(torch.from_numpy(x))[0].numpy()
        return mu, ImageScore(model)(torch.from_numpy(x), torch.from_numpy(eps)).numpy()


@pytest.mark.integration  # runs the `vae` command
def test_encode_reads_idx_npy_and_png_and_writes_what_the_server_answers(graphs, mnist_dir, tmp_path):
    folder, model = graphs
    digits = read_idx(mnist_dir / "t10k-images-idx3-ubyte")[:40]
    (tmp_path / "digits-idx3-ubyte").write_bytes(encode_idx(digits))
    np.save(tmp_path / "floats.npy", digits[:5].reshape(5, 784).astype(np.float64) / 255)
    Image.fromarray(digits[7]).save(tmp_path / "seven.png")
    inputs = [tmp_path / "digits-idx3-ubyte", tmp_path / "floats.npy", tmp_path / "seven.png"]
    # Batches of 16: the scores must not depend on them (the noise runs on across batches).
    done = vae("encode", *inputs, "--model", folder, "--seed", 5, "--batch-size", 16, "--out", tmp_path / "l.csv")
    assert "encode: 46 images" in done.stdout and "encode: 100%" in done.stderr  # a progress bar: 3 batches
    x = np.concatenate([digits, digits[:5], digits[7:8]]).reshape(46, 784).astype(np.float32) / 255
    mu, scores = expected(model, x, seed=5)
    with open(tmp_path / "l.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "mu_0", "mu_1", "mu_2", "score"] and len(rows) == 47
    assert [r[0] for r in rows[1:3]] == [f"{inputs[0]}:0", f"{inputs[0]}:1"] and rows[-1][0] == f"{inputs[2]}:0"
    table = np.array([r[1:] for r in rows[1:]], dtype=np.float64)
    np.testing.assert_allclose(table[:, :LATENT], mu, atol=1e-5)
    np.testing.assert_allclose(table[:, LATENT], scores, rtol=1e-5)
    vae("encode", *inputs, "--model", folder, "--seed", 5, "--out", tmp_path / "l.npy")  # one batch
    array = np.load(tmp_path / "l.npy")
    assert array.shape == (46, LATENT + 1) and array.dtype == np.float32
    np.testing.assert_allclose(array, table, rtol=1e-6, atol=1e-6)


@pytest.mark.integration  # runs the `vae` command
def test_sample_writes_the_servers_grid_or_the_images(graphs, tmp_path):
    folder, model = graphs
    vae("sample", "--n", 10, "--seed", 7, "--model", folder, "--out", tmp_path / "grid.png")
    vae("sample", "--n", 10, "--seed", 7, "--model", folder, "--out", tmp_path / "images.npy", "--batch-size", 4)
    z = np.random.default_rng(7).standard_normal((10, LATENT), dtype=np.float32)
    with torch.no_grad():
        images = ImageDecoder(model)(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), images, atol=1e-5)
    with Image.open(tmp_path / "grid.png") as grid, Image.open(io.BytesIO(png_grid(images))) as want:
        assert np.abs(np.asarray(grid, dtype=int) - np.asarray(want, dtype=int)).max() <= 1


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name, content, message", [
    ("labels-idx1-ubyte", encode_idx(np.zeros(3, dtype=np.uint8)), "shape [3]; images (N, 28, 28) or (N, 784)"),
    ("cut-idx3-ubyte", encode_idx(np.zeros((2, 28, 28), dtype=np.uint8))[:100], "truncated"),
    ("nan.npy", np.full((2, 784), np.nan, dtype=np.float32), "images 0 to 1: x: NaN or infinite values"),
    ("bright.npy", np.full((2, 784), 2.0), "images 0 to 1: x: values from 2 to 2"),
    ("ints.npy", np.zeros((2, 784), dtype=np.int64), "int64 values; uint8 (0-255) or floats in [0, 1]"),
    ("small.npy", np.zeros((2, 10, 10), dtype=np.uint8), "shape [2, 10, 10]"),
    ("photo.png", b"\x89PNG\r\n\x1a\n not really", "photo.png: the file is not a PNG image"),
    ("cut.png", _png()[:45], "cut.png: the file is not a readable PNG image: "),
    ("folder", None, "folder: a folder; image files are read (IDX, .npy or PNG)"),
])
def test_bad_inputs_are_named_and_leave_the_output_as_it_was(graphs, tmp_path, capsys, signals_kept, name, content,
                                                            message):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content)
    out = tmp_path / "latents.csv"
    out.write_text("earlier results\n")
    error = refused(capsys, "encode", path, "--model", graphs[0], "--out", out)
    assert f"vae encode: error: {path}" in error and message in error
    assert out.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, out.name])  # no partial output left


def test_a_full_disk_is_named_in_a_line_with_its_free_space_and_the_output_kept(graphs, tmp_path, capsys,
                                                                              signals_kept):
    with small_filesystem(tmp_path / "disk") as disk:
        out = disk / "images.npy"
        out.write_bytes(b"earlier")
        error = refused(capsys, "sample", "--n", 2000, "--model", graphs[0], "--out", out)  # 6 MB onto 256 KiB
        line = error.splitlines()[-1]  # after the progress bar
        assert line.startswith("vae sample: error: No space left on device (") and f" free in {disk}" in line
        assert line.endswith("; free some space and run it again") and "Traceback" not in error, error
        assert out.read_bytes() == b"earlier" and [p.name for p in disk.iterdir()] == [out.name]


def test_a_read_only_output_folder_is_named_in_a_line(graphs, tmp_path, capsys, signals_kept):
    with small_filesystem(tmp_path / "disk", "size=64k,ro") as disk:
        error = refused(capsys, "sample", "--n", 4, "--model", graphs[0], "--out", disk / "images.npy")
    assert error == f"vae sample: error: {disk}: cannot write images.npy there (Read-only file system)\n"


def test_a_decoder_alone_cannot_encode_and_says_what_to_use(graphs, tmp_path, capsys, signals_kept):
    (tmp_path / "decoder.onnx").write_bytes((graphs[0] / "decoder.onnx").read_bytes())
    (tmp_path / "x.npy").write_bytes(b"")
    error = refused(capsys, "encode", tmp_path / "x.npy", "--model", tmp_path / "decoder.onnx", "--out",
                    tmp_path / "l.csv")
    assert "no encoder or score graph beside the decoder" in error


def test_without_model_the_projects_graphs_are_used_from_a_folder_inside_it(graphs, tmp_path, monkeypatch,
                                                                            signals_kept):
    """`vae sample --out x.npy` in the project's plots/ uses the project's models/, not ./models/."""
    for name in ("params.yaml", "dvc.yaml"):
        (tmp_path / name).write_text("{}\n")
    shutil.copytree(graphs[0], tmp_path / "models")
    (tmp_path / "plots").mkdir()
    monkeypatch.chdir(tmp_path / "plots")
    assert cli.main(["sample", "--n", "3", "--out", "x.npy"]) == 0
    assert np.load(tmp_path / "plots" / "x.npy").shape == (3, 1, 28, 28)
