"""pipeline/export.py: every decoder the model can be exports to ONNX and matches torch in onnxruntime."""
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
