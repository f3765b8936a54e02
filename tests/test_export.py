"""pipeline/export.py: every decoder the model can be exports to ONNX and matches torch in onnxruntime."""
import os
import time
import warnings

import onnx
import pytest
import torch

from pipeline.export import check_parity, export_decoder
from pipeline.params import ExportParams
from vae.model import VAE, ImageDecoder, VAEConfig

LATENT = 4


def test_two_layer_decoder_exports_through_the_middle_layer_and_nothing_else(tmp_path):
    """z -> mean of z_mid -> pixels in the ONNX graph: its weights are the two decoder
    networks', none of the encoders', and onnxruntime matches torch."""
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(32,), mid_latent_dim=6, mid_hidden_dims=(8,)))
    decoder, path = ImageDecoder(model).eval(), tmp_path / "decoder.onnx"
    export_decoder(decoder, LATENT, path, opset=18)
    assert check_parity(decoder, LATENT, path, ExportParams())["worst_abs_diff"] <= 1e-5
    weights = {tensor.name for tensor in onnx.load(str(path)).graph.initializer if len(tensor.dims) == 2}
    assert {name.split(".")[1] for name in weights} == {"decoder", "upper_decoder"}


@pytest.mark.parametrize("activation", ["silu", "tanh"])
def test_each_activation_exports_and_matches_torch(tmp_path, activation):
    torch.manual_seed(0)
    decoder = ImageDecoder(VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(32,), activation=activation))).eval()
    export_decoder(decoder, LATENT, tmp_path / "decoder.onnx", opset=18)
    assert check_parity(decoder, LATENT, tmp_path / "decoder.onnx", ExportParams())["worst_abs_diff"] <= 1e-5


def test_the_latent_record_travels_in_the_onnx_metadata_and_a_bad_one_falls_back(tmp_path):
    """Export records the evaluate stage's latent order, spread and map in the decoder; the
    server's session reads them back. A record that does not fit the decoder (or none at
    all) gives index order with a warning, not a server that fails to start."""
    from pipeline.export import latent_metadata, record_metadata
    from pipeline.files import Layout, write_json
    from pipeline.serve.session import LATENT_ORDER, DecoderModel

    torch.manual_seed(0)
    decoder = ImageDecoder(VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(32,)))).eval()
    layout = Layout(tmp_path)
    write_json(layout.latent_stats, {"order": [3, 1, 0, 2], "spread": [0.5, 0.9, 0.1, 1.2]})
    layout.latent_plot.parent.mkdir()
    layout.latent_plot.write_bytes(b"\x89PNG not really")
    path = tmp_path / "decoder.onnx"
    export_decoder(decoder, LATENT, path, opset=18)
    record_metadata(path, latent_metadata(layout))
    assert check_parity(decoder, LATENT, path, ExportParams())["worst_abs_diff"] <= 1e-5  # the graph untouched
    served = DecoderModel(path, max_batch=8)
    assert served.latent_order == [3, 1, 0, 2] and served.latent_spread == [0.5, 0.9, 0.1, 1.2]
    assert served.latent_map == b"\x89PNG not really"

    export_decoder(decoder, LATENT, path, opset=18)
    record_metadata(path, {LATENT_ORDER: "[0, 1, 2]"})  # three dimensions of four, no spread
    with pytest.warns(UserWarning, match="the decoder's recorded latent order is unusable"):
        served = DecoderModel(path, max_batch=8)
    assert served.latent_order == [0, 1, 2, 3] and served.latent_spread is None and served.latent_map is None


@pytest.mark.parametrize("mid_latent_dim", [None, 6], ids=["one-layer", "two-layer"])
def test_the_encoder_and_the_score_export_with_a_dynamic_batch_and_match_torch(tmp_path, mid_latent_dim):
    """The encoder (x -> mu, logvar) and the score graph (x, eps -> -L_k, k fixed at export)
    in onnxruntime against torch at batches 1 and 256, within export.tolerance (the score,
    hundreds of nats in float32, to a relative 1e-6)."""
    import numpy as np

    from pipeline.export import export_encoder, export_score
    from pipeline.serve.session import open_session
    from vae.model import ImageEncoder, ImageScore

    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(32,), mid_latent_dim=mid_latent_dim,
                          mid_hidden_dims=(8,))).eval()
    k = 5
    export_encoder(model, tmp_path / "encoder.onnx", opset=18)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_score(model, k, tmp_path / "score.onnx", opset=18)
    assert not [w for w in caught if "axis name" in str(w.message)]  # x's and eps's batch: one name, no warning
    encoder, score = open_session(tmp_path / "encoder.onnx"), open_session(tmp_path / "score.onnx")
    assert [(i.name, i.shape) for i in score.get_inputs()] == [
        ("x", ["batch", 784]), ("eps", ["batch", k, model.config.noise_dim])]
    for n in (1, 256):
        x = (torch.rand(n, 784, generator=torch.Generator().manual_seed(n)) > 0.5).float()
        eps = torch.randn(n, k, model.config.noise_dim, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            mu, logvar = ImageEncoder(model)(x)
            expected = ImageScore(model)(x, eps)
        got_mu, got_logvar = encoder.run(["mu", "logvar"], {"x": x.numpy()})
        assert np.abs(got_mu - mu.numpy()).max() <= ExportParams().tolerance
        assert np.abs(got_logvar - logvar.numpy()).max() <= ExportParams().tolerance
        (got,) = score.run(["score"], {"x": x.numpy(), "eps": eps.numpy()})
        assert got.shape == (n,)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=ExportParams().tolerance)


def test_the_score_of_a_confident_decoder_stays_finite_and_matches_torch(tmp_path):
    """A trained decoder is confident: pixel logits of hundreds. The exporter's own form of
    the Bernoulli log-likelihood, log(sigmoid(logits)), gives -inf in onnxruntime below -88
    (it did for the first trained model exported); the exported form must not."""
    import numpy as np

    from pipeline.export import export_score
    from pipeline.serve.session import open_session
    from vae.model import ImageScore

    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(32,))).eval()
    with torch.no_grad():
        model.decoder.net[-1].weight.mul_(300)  # logits far beyond +-88
    export_score(model, 3, tmp_path / "score.onnx", opset=18)
    x = torch.rand(64, 784, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(64, 3, model.config.noise_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert model.decode(eps[:, 0, :LATENT]).abs().max() > 200
        expected = ImageScore(model)(x, eps).numpy()
    (got,) = open_session(tmp_path / "score.onnx").run(["score"], {"x": x.numpy(), "eps": eps.numpy()})
    assert np.isfinite(got).all() and np.isfinite(expected).all()
    np.testing.assert_allclose(got, expected, rtol=ExportParams().tolerance)


def test_a_graph_off_by_more_than_the_tolerance_is_named_and_nothing_is_written(tmp_path):
    """With a tolerance no float32 graph meets, the stage's encoder-and-score step raises
    naming the graph, and leaves no models/encoder.onnx or models/score.onnx behind."""
    from pipeline.export import ParityError, export_encoder_and_score
    from pipeline.files import Layout

    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(32,))).eval()
    layout = Layout(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ParityError, match=r"the encoder on CPUExecutionProvider: onnxruntime differs from torch by "
                                          r"\S+ at batch 1 \(> export.tolerance 1e-30\)"):
        export_encoder_and_score(model, layout, ExportParams(tolerance=1e-30, score_k=3))
    assert list((tmp_path / "models").iterdir()) == []
    report = export_encoder_and_score(model, layout, ExportParams(score_k=3))
    assert layout.encoder_onnx.is_file() and layout.score_onnx.is_file() and set(report) == {"encoder", "score"}


def test_a_vamp_priors_mixture_travels_in_the_decoder_and_the_server_draws_from_it(tmp_path):
    """Export records a VampPrior's components in the decoder; the served decoder's prior
    samples (what /v1/samples.png and `vae sample` decode) come from that mixture, not N(0, I):
    their mean and variance are the mixture's, the same for a seed. A standard prior records
    nothing; a record that does not fit the decoder warns and falls back to N(0, I)."""
    import json

    import numpy as np

    from pipeline.export import prior_metadata, record_metadata
    from pipeline.serve.session import PRIOR_MIXTURE, DecoderModel

    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=3, hidden_dims=(16,), prior="vamp", pseudo_inputs=5)).eval()
    model.init_pseudo_inputs(torch.rand(5, 784, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        model.encoder.head.weight.mul_(30)  # components far apart, and far from N(0, I)
        means, logvars = (t.double().numpy() for t in model.encoder(model.pseudo_inputs))
    path = tmp_path / "decoder.onnx"
    export_decoder(ImageDecoder(model), 3, path, opset=18)
    record_metadata(path, prior_metadata(model))
    served = DecoderModel(path, max_batch=8)
    assert served.parameters()["prior"] == "VampPrior of 5 components"
    draws = served.prior_samples(40_000, seed=1)
    mixture_mean = means.mean(0)
    mixture_var = (np.exp(logvars) + means ** 2).mean(0) - mixture_mean ** 2
    assert (np.abs(mixture_var - 1) > 0.5).all()  # N(0, I) draws would fail what follows
    assert (np.abs(draws.mean(0) - mixture_mean) < 4 * np.sqrt(mixture_var / len(draws))).all()
    np.testing.assert_allclose(draws.var(0), mixture_var, rtol=0.05)
    assert draws.dtype == np.float32 and np.array_equal(served.prior_samples(8, 2), served.prior_samples(8, 2))

    assert prior_metadata(VAE(VAEConfig(latent_dim=3, hidden_dims=(16,)))) == {}
    export_decoder(ImageDecoder(model), 3, path, opset=18)
    record_metadata(path, {PRIOR_MIXTURE: json.dumps({"means": [[0.0, 1.0]], "logvars": [[0.0, 0.0]]})})
    with pytest.warns(UserWarning, match=r"recorded prior mixture is unusable .*not \(K, 3\)"):
        served = DecoderModel(path, max_batch=8)
    assert served.mixture is None and served.parameters()["prior"] == "standard normal"


def decoder_and_moved(tmp_path) -> ImageDecoder:
    """A small decoder, exported as decoder.onnx, and beside it moved.onnx: the same with every
    weight moved by 1e-3."""
    torch.manual_seed(0)
    decoder = ImageDecoder(VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(32,)))).eval()
    moved = ImageDecoder(VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(32,)))).eval()
    moved.load_state_dict(decoder.state_dict())
    with torch.no_grad():
        for weight in moved.parameters():
            weight.add_(1e-3)
    for name, module in (("decoder.onnx", decoder), ("moved.onnx", moved)):
        export_decoder(module, LATENT, tmp_path / name, opset=18)
    return decoder


def check_sessions(tmp_path, names, reference, params: ExportParams, relative: bool = False) -> dict:
    """export's parity check of CPU sessions on the named graphs against `reference(z)`."""
    from pipeline.export import parity
    from pipeline.serve.session import open_session

    return parity([open_session(tmp_path / name, ["CPUExecutionProvider"]) for name in names], reference,
                  lambda n, g: {"z": torch.randn(n, LATENT, generator=g)}, params, "the decoder", relative)


def test_every_session_the_server_opens_is_checked(tmp_path):
    """With a GPU, `vae serve` opens two sessions on a graph, the CUDA provider's and the CPU's
    for small batches, and export checks both. Two real CPU sessions stand for them here, the
    second on a decoder whose weights moved: the first alone passes, the pair does not."""
    from pipeline.export import ParityError

    decoder = decoder_and_moved(tmp_path)

    def check(*names):
        return check_sessions(tmp_path, names, lambda z: [decoder(z)], ExportParams())
    assert check("decoder.onnx")["worst_abs_diff"] <= 1e-5
    assert check("decoder.onnx", "decoder.onnx")["providers"] == ["CPUExecutionProvider"] * 2
    with pytest.raises(ParityError, match=r"the decoder on CPUExecutionProvider: .* at batch 1 "):
        check("decoder.onnx", "moved.onnx")


def test_parity_holds_up_to_the_tolerance_and_a_relative_check_is_over_the_size(tmp_path):
    """The moved graph is off by some d: a tolerance of d passes it, one just under refuses it.
    A relative check divides each difference by max(1, |torch's value|), as for the score's
    hundreds of nats: against torch's outputs plus 99, the graph is off by 99 in all, by about
    99/100 relative to them."""
    from pipeline.export import ParityError

    decoder = decoder_and_moved(tmp_path)

    def check(tolerance, shift=0.0, relative=False):
        return check_sessions(tmp_path, ["moved.onnx"], lambda z: [decoder(z) + shift],
                              ExportParams(tolerance=tolerance), relative)["worst_abs_diff"]
    off = check(tolerance=1.0)
    assert 1e-5 < off < 0.1 and check(tolerance=off) == off
    with pytest.raises(ParityError, match=r"differs from torch by \S+ at batch 256 \(> export.tolerance"):
        check(tolerance=off * 0.99)
    assert 98 < check(tolerance=100, shift=99.0) < 100
    assert 0.98 < check(tolerance=1.0, shift=99.0, relative=True) < 1.0


def _export_project(tmp_path, monkeypatch, eval_json: str):
    """A folder as the export stage finds it after train and evaluate (a small model); its layout."""
    import shutil

    from pipeline.files import Layout

    from helpers import ROOT

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    shutil.copy(ROOT / "params.yaml", tmp_path)
    layout = Layout()
    layout.model.parent.mkdir()
    torch.save(VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(32,))).to_checkpoint(), layout.model)
    layout.mlflow_run.write_text('{"run_id": "0123456789abcdef"}')
    layout.eval_metrics.parent.mkdir()
    layout.eval_metrics.write_text(eval_json)
    return layout


def _export_run(layout):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{layout.mlflow_db}")
    [run] = client.search_runs([client.get_experiment_by_name("vae-mnist").experiment_id])
    return run


def test_an_eval_metrics_file_cut_short_stops_export_before_it_writes_a_graph(tmp_path, monkeypatch):
    """metrics/eval.json decides the champion: cut short, the stage names it and writes nothing,
    and its MLflow run is marked FAILED with that error."""
    from pipeline import export
    from pipeline.files import StageFileError

    layout = _export_project(tmp_path, monkeypatch, '{"neg_elbo": ')
    with pytest.raises(StageFileError, match=f"^{layout.eval_metrics}: not JSON"):
        export.main()
    assert sorted(p.name for p in layout.model.parent.iterdir()) == ["mlflow_run.json", "vae.pt"]
    assert sorted(p.name for p in layout.eval_metrics.parent.iterdir()) == ["eval.json"]
    run = _export_run(layout)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("StageFileError: ")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_mid_export_ends_it_in_a_line_with_nothing_written_and_the_run_killed(
        tmp_path, monkeypatch, capsys, signals_kept, signame):
    """SIGTERM (`kill`, a container's stop) or SIGHUP (the terminal closed) while the decoder's
    graph is half done: the CLI says `interrupted` (status 130, as Ctrl-C), the temporary graph
    is gone, the run is KILLED. Before, Python's default for either ended the process on the
    spot: no cleanup, and the MLflow run left as it was (RUNNING, had train been the stage)."""
    import signal

    from pipeline import cli, export

    layout = _export_project(tmp_path, monkeypatch, '{"neg_elbo": 100.0}')

    def terminated(*args):
        os.kill(os.getpid(), getattr(signal, signame))
        time.sleep(10)  # the handler raises before this ends
        raise AssertionError(f"{signame} did not stop the stage")

    monkeypatch.setattr(export, "check_parity", terminated)
    assert cli.main(["export"]) == 130
    err = capsys.readouterr().err  # MLflow may log before: its store made afresh
    assert err.splitlines()[-1] == "vae export: interrupted" and "Traceback" not in err, err
    assert sorted(p.name for p in layout.model.parent.iterdir()) == ["mlflow_run.json", "vae.pt"]
    run = _export_run(layout)
    assert run.info.status == "KILLED" and run.data.tags["error"] == "interrupted"


def test_an_opset_the_exporter_or_onnxruntime_cannot_give_is_named_not_written_as_another(tmp_path, monkeypatch):
    """export.opset 29 used to give opset 18 graphs (onnxscript's converter fell back, in warnings),
    and export.json said 29; 28 is written, but onnxruntime 1.31 opens up to 26."""
    from pipeline.export import ExportError, check_parity
    from pipeline.params import ParamsError

    decoder = ImageDecoder(VAE(VAEConfig(latent_dim=LATENT, hidden_dims=(8,)))).eval()
    newest = onnx.defs.onnx_opset_version()
    with pytest.raises(ParamsError, match=f"^export.opset: {newest + 1}: onnx .* writes opsets up to {newest}$"):
        export_decoder(decoder, LATENT, tmp_path / "past.onnx", opset=newest + 1)
    assert not (tmp_path / "past.onnx").exists()
    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: newest + 10)  # as if onnx claimed more
    with pytest.raises(ExportError, match=f"^export.opset: {newest + 1} asked, but the exporter wrote opset 18$"):
        export_decoder(decoder, LATENT, tmp_path / "fallen-back.onnx", opset=newest + 1)
    monkeypatch.undo()
    export_decoder(decoder, LATENT, tmp_path / "newest.onnx", opset=newest)
    with pytest.raises(ExportError, match="^onnxruntime .* cannot open the decoder as exported: .*opset"):
        check_parity(decoder, LATENT, tmp_path / "newest.onnx", ExportParams())
