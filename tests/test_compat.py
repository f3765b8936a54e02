"""pipeline/compat.py: every private API the pipeline uses still exists at the pinned versions.
An upgrade that moves one fails here, by name, rather than deep inside a training run."""
from pipeline import compat


def test_every_private_symbol_imports():
    from ray._private.worker import get_dashboard_url  # what ray_dashboard_url calls (it needs a running Ray)

    assert callable(get_dashboard_url)

    trainer = compat.torch_trainer_without_placement_group_cleaner()
    assert "_create_default_callbacks" in vars(trainer)
    from ray.train.torch import TorchTrainer

    assert callable(TorchTrainer._create_default_callbacks)  # the method overridden
    compat.quiet_ray_train_reports()
    compat.require_cxx_compiler()  # g++ is on this machine: passes
    compat.quiet_dynamo()
    reconstruct = compat.numpy_array_reconstructor()
    import pickle

    import numpy as np

    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert pickle.loads(pickle.dumps(array, protocol=2)).__reduce__()[0] is reconstruct

