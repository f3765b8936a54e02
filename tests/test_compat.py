"""pipeline/compat.py: every private API the pipeline uses still exists at the pinned versions.
An upgrade that moves one fails here, by name, rather than deep inside a training run."""
import inspect

from pipeline import compat


def test_every_private_symbol_imports():
    from ray._private.worker import get_dashboard_url  # what ray_dashboard_url calls (it needs a running Ray)

    assert callable(get_dashboard_url)

    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    def callbacks(trainer_class, **datasets) -> list[str]:
        trainer = trainer_class(lambda: None, scaling_config=ScalingConfig(num_workers=1), datasets=datasets or None)
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    # The override drops exactly these from Ray's defaults (gone or renamed: this fails).
    cleaner, datasets = "PlacementGroupCleanerCallback", "DatasetsCallback"
    rays = callbacks(TorchTrainer)
    assert {cleaner, datasets} <= set(rays)
    assert callbacks(compat.lean_torch_trainer(True)) == [c for c in rays if c not in (cleaner, datasets)]
    assert callbacks(compat.lean_torch_trainer(False)) == [c for c in rays if c != datasets]
    assert callbacks(compat.lean_torch_trainer(False), train=lambda: None) == rays  # a run with datasets keeps it
    compat.quiet_ray_train_reports()
    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as requests

    assert requests.logger.name == compat.RESOURCE_REQUEST_LOGGER and "Failed to send resource request" in \
        inspect.getsource(requests)  # the warning the logger is quieted for
    compat.require_cxx_compiler()  # g++ is on this machine: passes
    compat.quiet_dynamo()
    assert callable(compat.mlflow_system_metrics_monitor())
    reconstruct = compat.numpy_array_reconstructor()
    import pickle

    import numpy as np

    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert pickle.loads(pickle.dumps(array, protocol=2)).__reduce__()[0] is reconstruct

