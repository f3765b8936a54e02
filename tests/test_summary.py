"""pipeline/summary.py: what `vae summary` and the end of `make repro` tell the user."""
import json

from pipeline import cli
from pipeline import summary as summary_module
from pipeline.files import Layout
from pipeline.summary import summary

EVAL = {"neg_elbo": 97.94, "recon": 77.15, "kl": 20.79, "iwae_k": 100, "nll_iwae": 94.81}


def test_before_any_run_it_says_how_to_run_and_names_nothing_that_is_not_there(tmp_path):
    text = summary(Layout(tmp_path))
    assert text.strip() == f"Results: none yet in {tmp_path}; `make repro` (or `dvc repro`) runs the pipeline"


def test_after_a_run_it_names_the_figures_the_outputs_the_run_and_how_to_serve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `vae summary` in the project
    layout = Layout(tmp_path)
    for path in (layout.model, layout.decoder_onnx):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    layout.mlflow_run.write_text(json.dumps({"run_id": "0db293b2", "experiment": "vae-mnist"}))
    assert "vae serve models/" in summary(layout)
    layout.decoder_onnx.unlink()  # trained, not yet exported: nothing to serve
    text = summary(layout)
    assert "MLflow run:   0db293b2 (experiment vae-mnist)" in text and "vae serve" not in text
    assert "model:        models/vae.pt" in text and "test -ELBO" not in text
    layout.eval_metrics.parent.mkdir()
    layout.eval_metrics.write_text(json.dumps(EVAL))
    assert "test -ELBO 97.94 nats/image (recon 77.15, KL 20.79); IWAE k=100 NLL 94.81" in summary(layout)


def test_from_a_folder_inside_the_project_it_finds_the_project_and_shows_paths_from_there(tmp_path, monkeypatch,
                                                                                        capsys):
    """`cd models; vae summary` said "none yet in .../models": the project is found above, as git
    and DVC find theirs, and each path is shown as it is typed from where the user is."""
    for name in ("params.yaml", "dvc.yaml"):
        (tmp_path / name).write_text("{}\n")
    layout = Layout(tmp_path)
    for path in (layout.model, layout.decoder_onnx):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    monkeypatch.chdir(tmp_path / "models")
    summary_module.main()
    text = capsys.readouterr().out
    assert "model:        vae.pt" in text and "vae serve ./" in text, text
    assert f"sqlite:///{tmp_path}/mlflow.db" in text  # the project's store, not one in models/


def test_outside_any_project_it_says_so(tmp_path, monkeypatch, capsys, signals_kept):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["summary"]) == 2
    assert capsys.readouterr().err == (f"vae summary: error: {tmp_path}: no project here; run vae in the project "
                                       "(the folder with params.yaml and dvc.yaml) or a folder inside it\n")
