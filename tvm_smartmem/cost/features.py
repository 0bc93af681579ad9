"""Keys and features of fusion candidates (what the profile database and the model see)."""

from __future__ import annotations

import hashlib
import json


def _unit_ops(planner, units: set[int]) -> list[dict]:
    out = []
    for u in sorted(units):
        for i in sorted(planner.units[u].members):
            n = planner.ecg.nodes[i]
            out.append({"op": _op_family(n.op), "mapping": n.mapping.short,
                        "shape": list(n.shape) if n.shape else None, "dtype": n.dtype})
    return out


def _op_family(name: str) -> str:
    """PrimFunc names carry numeric suffixes (matmul3): the family is what matters."""
    return name.rstrip("0123456789_")


def candidate_key(planner, block: set[int], cand: int, forward: bool, target) -> dict:
    """A JSON-able description of "fuse ``cand`` into ``block``" on ``target``."""
    producer = block if forward else {cand}
    consumer = {cand} if forward else block
    key = {
        "producer": _unit_ops(planner, producer),
        "consumer": _unit_ops(planner, consumer),
        "target": str(target.kind.name) if target is not None else "any",
    }
    key["id"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return key


def numeric_features(key: dict) -> list[float]:
    """Fixed-length features for the xgboost model: sizes and mapping-type counts per side."""
    kinds = ["OtO", "OtM", "MtM", "Reorg", "Shuffle"]
    feats: list[float] = []
    for side in ("producer", "consumer"):
        ops = key[side]
        numel = [_numel(o["shape"]) for o in ops]
        feats += [len(ops), float(max(numel, default=0)), float(sum(numel))]
        feats += [float(sum(o["mapping"] == k for o in ops)) for k in kinds]
    p, c = feats[2], feats[2 + 8]
    feats.append(c / p if p else 0.0)
    return feats


def _numel(shape) -> int:
    if not shape:
        return 0
    n = 1
    for d in shape:
        n *= d if isinstance(d, int) else 1
    return n
