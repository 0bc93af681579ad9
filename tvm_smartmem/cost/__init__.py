"""Cost layer for the fusion planner's yellow decisions.

DNNFusion decides its "yellow" fusion-table cells by measurement.  The order of evidence here:

1. **measured**: the profile database (:class:`ProfileDB`) has latencies of the fused block and
   of its parts for this key (operator types, shapes, dtype, target);
2. **model**: an xgboost model trained on that database predicts the missing case;
3. **analytic**: without either, a rule of thumb -- fusing saves a launch and the
   intermediate's round trip, and only a computing prologue inlined into a many-to-many consumer
   costs more (it is recomputed per reuse), see :func:`analytic_should_fuse`.

Each verdict says which of the three it came from; the planner records that.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Verdict:
    fuse: bool
    source: str  # "measured" | "model" | "analytic"


class CostLayer:
    """Answers ``should_fuse`` from the database, the model, or the analytic estimate."""

    def __init__(self, db=None, model=None):
        self.db = db
        self.model = model

    @classmethod
    def of(cls, profile_db) -> CostLayer:
        if isinstance(profile_db, CostLayer):
            return profile_db
        if profile_db is None:
            return cls()
        from .db import ProfileDB

        db = profile_db if isinstance(profile_db, ProfileDB) else ProfileDB(profile_db)
        from .model import LatencyModel

        return cls(db, LatencyModel.from_db(db))

    def should_fuse(self, planner, block: set[int], cand: int, forward: bool, target) -> Verdict:
        from .features import candidate_key

        key = candidate_key(planner, block, cand, forward, target)
        if self.db is not None:
            row = self.db.lookup(key)
            if row is not None:
                return Verdict(row.fused_ms < row.parts_ms, "measured")
        if self.model is not None and self.model.ready:
            return Verdict(self.model.predict_gain(key) > 0, "model")
        return Verdict(analytic_should_fuse(planner, block, cand, forward), "analytic")


def analytic_should_fuse(planner, block: set[int], cand: int, forward: bool) -> bool:
    """Fuse, except a computing prologue into a many-to-many consumer.

    TVM's schedules inline elementwise producers into a matmul / conv operand's loads, so such a
    prologue is recomputed for every reuse of the operand (N times per element of a matmul input);
    DNNFusion's own code generator computes it once, which is why its table says green.  A
    many-to-many *producer* followed by an expanding consumer (squeeze-excitation's 1x1 conv ->
    sigmoid -> broadcast multiply) is fine: FuseTIR keeps the reduction's result in a buffer of
    its own inside the kernel, computed once.
    """
    producer_units = block if forward else {cand}
    consumer_units = {cand} if forward else block
    return not planner._prologue_compute(producer_units, consumer_units)
