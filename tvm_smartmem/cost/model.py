"""An xgboost model of fusion gain, trained on the profile database.

It predicts the relative time saved by fusing a candidate (``(parts - fused) / parts``) from the
numeric features of its key, so that the planner can answer yellow cells the database has not
measured.  With fewer than :data:`MIN_ROWS` rows it declines (``ready`` is False) rather than
guess from nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .features import numeric_features

MIN_ROWS = 8


class LatencyModel:
    def __init__(self, booster=None):
        self.booster = booster

    @property
    def ready(self) -> bool:
        return self.booster is not None

    @classmethod
    def from_db(cls, db, target: str | None = None) -> LatencyModel:
        rows = db.rows(target)
        if len(rows) < MIN_ROWS:
            return cls()
        return cls.train([r.key for r in rows], [r.gain for r in rows])

    @classmethod
    def train(cls, keys: list[dict], gains: list[float], rounds: int = 200) -> LatencyModel:
        import xgboost as xgb

        x = np.array([numeric_features(k) for k in keys], dtype=np.float64)
        y = np.array(gains, dtype=np.float64)
        booster = xgb.train({"max_depth": 4, "eta": 0.1, "objective": "reg:squarederror",
                             "verbosity": 0}, xgb.DMatrix(x, label=y), num_boost_round=rounds)
        return cls(booster)

    def predict_gain(self, key: dict) -> float:
        import xgboost as xgb

        if self.booster is None:
            raise ValueError("the latency model is not trained (too few measurements)")
        x = np.array([numeric_features(key)], dtype=np.float64)
        return float(self.booster.predict(xgb.DMatrix(x))[0])

    def save(self, path: str | Path) -> None:
        if self.booster is None:
            raise ValueError("nothing to save: the model is not trained")
        self.booster.save_model(str(path))

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(str(path))
        return cls(booster)
