"""pipeline/params.py: the only reader of params.yaml."""
from pathlib import Path

import pytest
import yaml

from pipeline.params import Params, ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repository_params_are_valid_and_explicit():
    params = load_params(ROOT / "params.yaml")
    assert params == Params()  # params.yaml spells out the schema's defaults, no surprises
    assert params == Params.model_validate(params.model_dump())
    # Every key is spelled out: a key left out would still compare equal above.
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    schema = Params().model_dump()
    assert raw.keys() == schema.keys()
    for section, values in raw.items():
        assert values.keys() == schema[section].keys(), f"params.yaml's {section} section"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ParamsError, match=r"params.yaml: train.epoch: unknown key"):
        load_params(write(tmp_path, "train:\n  epoch: 3\n"))
    with pytest.raises(ParamsError, match=r"params.yaml: trian: unknown key"):
        load_params(write(tmp_path, "trian:\n  epochs: 3\n"))


def test_bad_value_is_named_with_what_was_given(tmp_path):
    with pytest.raises(ParamsError, match=r"train.epochs: Input should be greater than or equal to 1 \(got 0\)"):
        load_params(write(tmp_path, "train:\n  epochs: 0\n"))
    negative = r"model.hidden_dims.1: Input should be greater than or equal to 1 \(got -1\)"
    with pytest.raises(ParamsError, match=negative):
        load_params(write(tmp_path, "model:\n  hidden_dims: [400, -1]\n"))
    with pytest.raises(ParamsError, match=r"model.activation: Input should be 'relu', 'silu' or 'tanh'"):
        load_params(write(tmp_path, "model:\n  activation: gelu\n"))
    with pytest.raises(ParamsError, match=r"train.lr: Input should be a finite number \(got inf\)"):
        load_params(write(tmp_path, "train:\n  lr: .inf\n"))  # passed gt=0, and trained to NaN
    with pytest.raises(ParamsError, match=r"train.use_gpu"):
        load_params(write(tmp_path, "train:\n  use_gpu: maybe\n"))


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(write(tmp_path, "train: [\n"))
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")


def test_outside_a_project_the_missing_params_yaml_says_where_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError) as e:
        load_params()
    assert str(e.value) == (f"{tmp_path}/params.yaml: not found; run vae in the project (the folder with "
                            "params.yaml and dvc.yaml) or a folder inside it")


def test_a_key_given_twice_is_named_as_dvc_refuses_it(tmp_path):
    """PyYAML keeps the last of two keys silently: `vae train` by hand trained 2 epochs where the
    user's edit, higher up, said 7 (DVC refuses such a file: ruamel's duplicate-key error)."""
    with pytest.raises(ParamsError, match=r"^\S+params.yaml: line 4: 'epochs' given twice \(first on line 2\)$"):
        load_params(write(tmp_path, "train:\n  epochs: 7\n  seed: 1\n  epochs: 2\n"))
    with pytest.raises(ParamsError, match=r"line 3: 'train' given twice \(first on line 1\)"):
        load_params(write(tmp_path, "train:\n  epochs: 7\ntrain:\n  seed: 1\n"))
    # A key beside a merge (`<<`) overrides the merged one, as YAML means it: not a duplicate.
    merged = load_params(write(tmp_path, "train:\n  <<: {epochs: 7, seed: 3}\n  epochs: 2\n"))
    assert (merged.train.epochs, merged.train.seed) == (2, 3)


def test_values_that_do_not_go_together_are_named(tmp_path):
    with pytest.raises(ParamsError, match=r"params.yaml: train.grad_estimator: dreg needs train.iwae_k > 1 \(got 1\)"):
        load_params(write(tmp_path, "train:\n  grad_estimator: dreg\n"))
    with pytest.raises(ParamsError, match=r"train.grad_estimator: dreg takes one stochastic layer or "
                                          r"model.mid_layout: top_down \(got model.mid_latent_dim: 10 with the chain"):
        load_params(write(tmp_path, "train:\n  grad_estimator: dreg\n  iwae_k: 5\nmodel:\n  mid_latent_dim: 10\n"))
    assert load_params(write(tmp_path, "train:\n  grad_estimator: dreg\n  iwae_k: 5\n")).train.grad_estimator == "dreg"
    with pytest.raises(ParamsError, match=r"model.prior: vamp takes one stochastic layer or model.mid_layout: "):
        load_params(write(tmp_path, "model:\n  prior: vamp\n  mid_latent_dim: 10\n"))
    top_down = load_params(write(tmp_path, "train:\n  grad_estimator: dreg\n  iwae_k: 5\nmodel:\n  prior: vamp\n"
                                           "  mid_latent_dim: 10\n  mid_layout: top_down\n"))
    assert top_down.model.vae_config().top_down and top_down.train_config().dreg
    with pytest.raises(ParamsError, match=r"model.mid_layout: Input should be 'chain' or 'top_down'"):
        load_params(write(tmp_path, "model:\n  mid_layout: ladder\n"))
    with pytest.raises(ParamsError, match=r"train.kl_warmup_epochs: 40 is more than train.epochs \(30\)"):
        load_params(write(tmp_path, "train:\n  kl_warmup_epochs: 40\n"))
    with pytest.raises(ParamsError, match=r"train.kl_warmup_epochs: Input should be greater than or equal to 0"):
        load_params(write(tmp_path, "train:\n  kl_warmup_epochs: -1\n"))
    with pytest.raises(ParamsError, match=r"model.pseudo_inputs: 500 pseudo-inputs start as training images, "
                                          r"but data.max_train_images is 300"):
        load_params(write(tmp_path, "model:\n  prior: vamp\ndata:\n  max_train_images: 300\n"))
    with pytest.raises(ParamsError, match=r"model.prior"):
        load_params(write(tmp_path, "model:\n  prior: gaussian\n"))


def test_each_limit_holds_at_its_edge(tmp_path):
    """The last value a check lets through passes, the next is refused: KL warm-up as long as
    training, as many pseudo-inputs as training images, all but one training image held out."""
    edge = load_params(write(tmp_path, "train:\n  kl_warmup_epochs: 30\ndata:\n  max_train_images: 500\n"
                                       "  val_size: 59999\nmodel:\n  prior: vamp\n"))
    assert (edge.train.kl_warmup_epochs, edge.model.pseudo_inputs, edge.data.val_size) == (30, 500, 59999)
    with pytest.raises(ParamsError, match=r"train.kl_warmup_epochs: 31 is more than train.epochs \(30\)"):
        load_params(write(tmp_path, "train:\n  kl_warmup_epochs: 31\n"))
    with pytest.raises(ParamsError, match=r"model.pseudo_inputs: 500 .* data.max_train_images is 499"):
        load_params(write(tmp_path, "model:\n  prior: vamp\ndata:\n  max_train_images: 499\n"))
    with pytest.raises(ParamsError, match=r"data.val_size: Input should be less than 60000 \(got 60000\)"):
        load_params(write(tmp_path, "data:\n  val_size: 60000\n"))


@pytest.mark.parametrize("binarize, grad_estimator", [("none", "iwae"), ("dynamic", "dreg")])
def test_train_config_is_what_the_train_and_data_sections_say(binarize, grad_estimator):
    params = Params.model_validate({"data": {"binarize": binarize},
                                    "train": {"grad_estimator": grad_estimator, "iwae_k": 5, "kl_warmup_epochs": 3}})
    config = params.train_config()
    assert config.binarize == (binarize == "dynamic") and config.dreg == (grad_estimator == "dreg")
    assert (config.iwae_k, config.kl_warmup_epochs, config.epochs, config.seed) == (5, 3, 30, 0)
