"""Train the factory model of the simulated activity-recognition device with river.

>>> fm = train_factory_model(seed=0, n=400)
>>> len(fm.features), fm.classes
(8, ['still', 'walk', 'run', 'cycle'])
"""

from __future__ import annotations

import numpy as np
from river import linear_model, optim, preprocessing

from edge_agent.blob.float_model import FloatLinearModel
from edge_agent.device.simulator import CLASSES, FEATURES, generate_dataset
from service.learn.river_export import export_linear


def make_pipeline() -> object:
    """The model family every simulated device runs: ``StandardScaler | SoftmaxRegression``."""
    return preprocessing.StandardScaler() | linear_model.SoftmaxRegression(
        optimizer=optim.SGD(0.05), l2=1e-4
    )


def train_factory_model(seed: int = 0, n: int = 6000, epochs: int = 3) -> FloatLinearModel:
    """Fit on ``n`` stationary readings pooled over simulated devices; export float params."""
    x, y = generate_dataset(n, seed=seed)
    pipe = make_pipeline()
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for i in rng.permutation(len(x)):
            pipe.learn_one(dict(zip(FEATURES, map(float, x[i]), strict=True)), CLASSES[int(y[i])])  # type: ignore[attr-defined]
    return export_linear(pipe, FEATURES, CLASSES)
