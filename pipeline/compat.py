"""Every private API of a dependency that the pipeline uses, in one place.

Written against the pinned versions: ray 2.60.0, torch 2.14.1, mlflow 3.17.2, numpy 2.x (see uv.lock).
Each has no public form there; an upgrade that moves one fails here, by name, and
tests/test_compat.py imports them all so that it fails in the tests first.
"""
from __future__ import annotations

import logging


def ray_dashboard_url() -> str | None:
    """The running Ray's dashboard address (None without a dashboard)."""
    from ray._private.worker import get_dashboard_url

    return get_dashboard_url()


def lean_torch_trainer(drop_placement_group_cleaner: bool, drop_unused_datasets: bool = True):
    """TorchTrainer less the default callbacks of Ray Train V2 that do nothing for a run, by
    overriding a private method. Without datasets, the datasets callback: it still starts a
    DatasetManager actor each run, a process that imports Ray Data (2 s of CPU a run here;
    benchmarks/ray_train_callbacks.py keeps it for its reference). Without a dashboard, the
    placement-group cleaner: it asks the dashboard's state API and, without one, prints only
    tracebacks at every run's start and end."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            unused = (DatasetsCallback,) * (drop_unused_datasets and not self.datasets) + \
                (PlacementGroupCleanerCallback,) * drop_placement_group_cleaner
            return [callback for callback in super()._create_default_callbacks() if not isinstance(callback, unused)]

    return Trainer


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report() at INFO through a logger named by its file path, which
    escapes its own log-level setting; mute it so the console shows our epoch lines."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


# The module whose logger warns, with a traceback, when Ray Train's controller waited 5 s for
# Ray's autoscaling coordinator: the first run on a cluster creates that actor, a process that
# a loaded machine starts in more than 5 s. Ray calls it safe to ignore, and the controller
# asks again 20 s later; our workers' counts are fixed (no autoscaler needs telling).
RESOURCE_REQUEST_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"


def quiet_ray_train_resource_requests() -> None:
    """Run in every Ray worker process of our jobs (ray_connect's worker_process_setup_hook),
    among them Ray Train's controller. A filter, not a level: the controller then configures
    its "ray.train" logger, which resets the levels of the loggers below (logging.config). By
    name, so that no worker imports Ray Data for it."""
    logging.getLogger(RESOURCE_REQUEST_LOGGER).addFilter(lambda record: record.levelno >= logging.ERROR)


def require_cxx_compiler() -> None:
    """Raise InvalidCxxCompiler's message as a RuntimeError when inductor finds no C++ compiler."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as e:
        raise RuntimeError(str(e)) from None


# torch.compile of DReG's gradient hook works on the lock's torch and fails on 2.11 (a GPU image's):
# "Node mul referenced nonexistent value logvar" (tests/test_model.py traces it where it works).
COMPILES_DREG_FROM = (2, 14)


def compiles_dreg() -> bool:
    import torch
    from torch.torch_version import TorchVersion

    return TorchVersion(torch.__version__) >= COMPILES_DREG_FROM


def quiet_dynamo() -> None:
    import torch

    torch._logging.set_logs(dynamo=logging.ERROR)


def mlflow_system_metrics_monitor():
    """MLflow's system-metrics sampler (CPU, memory, disk, network), a class its docs do not
    name. The public switch, mlflow.start_run(log_system_metrics=True), ties it to a fluent run
    whose end marks the run FINISHED; the pipeline's run spans three stage processes and is
    finished by the train driver once the outputs are written, so tracking.py drives the class."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    return SystemMetricsMonitor


def numpy_array_reconstructor():
    """What a pickled numpy array calls to rebuild itself (numpy.core.multiarray._reconstruct)."""
    from numpy._core.multiarray import _reconstruct

    return _reconstruct
