"""Numerical agreement with a reference, with one tolerance table for the whole project.

The error measure is the *scale-normalised* maximum error,
``max |out - ref| / max(max |ref|, 1)``: it is an absolute error for outputs of magnitude below
one and a relative error above, so it neither explodes on near-zero elements (softmax tails,
GELU of negative inputs) nor hides errors in large outputs.

| dtype | tolerance | why |
|---|---|---|
| float32 | 1e-4 | reassociated reductions (tiling, fusion) change the last few bits |
| float16 | 2e-2 | 11-bit mantissa, accumulations of a few hundred terms |
| bfloat16 | 5e-2 | 8-bit mantissa |
| integers / bool | 0 | exact |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

TOLERANCE: dict[str, float] = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-2,
                               "bfloat16": 5e-2}


def tolerance(dtype: np.dtype | str) -> float:
    return TOLERANCE.get(str(np.dtype(dtype)) if str(dtype) != "bfloat16" else "bfloat16", 0.0)


def max_error(out: np.ndarray, ref: np.ndarray) -> float:
    """Scale-normalised max error (see module docstring); a shape mismatch, or NaN anywhere in
    the reference, is an infinite error."""
    out, ref = np.asarray(out), np.asarray(ref)
    if out.shape != ref.shape:
        return float("inf")
    if ref.dtype.kind in "fc" and np.isnan(ref).any():
        # a reference holding NaN vouches for nothing: an all-NaN output would "match" it
        # (seen: random weights that overflowed a mask made a whole reference NaN)
        return float("inf")
    if out.size == 0:
        return 0.0
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    if not np.all(np.isfinite(out) == np.isfinite(ref)):
        return float("inf")
    diff = np.where(np.isfinite(diff), diff, 0.0)
    scale = max(float(np.max(np.abs(np.where(np.isfinite(ref), ref, 0.0)))), 1.0)
    return float(np.max(diff)) / scale


def compare(outs: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> tuple[bool, float]:
    """(all within tolerance, worst error) over paired outputs."""
    if len(outs) != len(refs):
        return False, float("inf")
    worst, ok = 0.0, True
    for o, r in zip(outs, refs, strict=True):
        err = max_error(o, r)
        worst = max(worst, err)
        ok &= err <= tolerance(np.asarray(r).dtype)
    return ok, worst


def onnxruntime_reference(model, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ONNX Runtime (CPU) for ``model`` (a ModelProto) on named ``inputs``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, dict(inputs))]
