"""Knob search for the texture schedule rules: a genetic search scored on the device.

The texture rules of :mod:`.schedules` have knobs whose best values depend on the GPU:
``TextureMatmul`` the GEMM tiling of ``gpu.Matmul.Config`` (thread-block shape, per-thread
micro tile, reduction step, unroll), ``TextureElementwise`` and ``TextureFallback`` the threads
per block, ``TextureRowReduction`` the widest block a row gets.  This module searches them for
one device and writes what wins into a texture target's table entry (``<kind>-texture`` of
``tir/matmul_configs.json``: ``config`` for the GEMM, ``rules`` for the others), which the
rules read when they are not given values (:func:`.schedules.rule_knob`).

Why whole models score a candidate rather than one kernel per rule: the knobs act on fused
kernels of many shapes, ``PackActivationsToTexture`` tries kernels on the rules before it
places a tensor in an image (a knob can move a tensor between image and buffer), and what is
optimised is the model's latency.  A candidate is compiled exactly as the pipeline compiles
(its table given through ``TVM_SMARTMEM_MATMUL_CONFIGS``), run with the project's runners and
checked against the reference outputs: a candidate that does not build, does not launch or
gives different numbers scores infinity and never wins.  Each measurement lands in the profile
database (table ``schedule_knobs``), so a search repeated or resumed on the same device and
models measures nothing twice.

The search is a small genetic algorithm, as in the papers' auto-tuners: the starting point (the
table's current values) plus random candidates, then per generation the better half survives
and breeds (uniform crossover, each knob mutated to a neighbouring value with some
probability).  ``tvm-smartmem tune-schedules`` runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .matmul import ENV, RULE_KNOBS, TABLE, load_table, texture_key

#: rule.knob -> the values tried (each list ordered, so "neighbouring" means adjacent)
SPACE: dict[str, tuple[int, ...]] = {
    "TextureMatmul.block_size_x": (4, 8, 16, 32),
    "TextureMatmul.block_size_y": (4, 8, 16, 32),
    "TextureMatmul.micro_size_x": (1, 2, 4, 8),
    "TextureMatmul.micro_size_y": (1, 2, 4, 8),
    "TextureMatmul.micro_size_k": (4, 8, 16, 32),
    "TextureMatmul.unroll": (0, 16, 64, 256),
    "TextureElementwise.threads": (32, 64, 128, 256, 512),
    "TextureRowReduction.max_threads": (32, 64, 128, 256, 512),
    "TextureFallback.threads": (16, 32, 64, 128, 256),
}

Candidate = dict[str, int]


def _key(c: Candidate) -> tuple:
    return tuple(sorted(c.items()))


def gemm_config(table: dict, kind: str) -> dict:
    """The GEMM config ``TextureMatmul`` uses for ``kind``: the texture entry's, else the
    buffer entry's, else dlight's generic GPU one."""
    entry = table.get(texture_key(kind), {})
    if "config" in entry:
        return dict(entry["config"])
    if "config" in table.get(kind, {}):
        return dict(table[kind]["config"])
    from tvm.s_tir.dlight import gpu

    return dataclasses.asdict(gpu.Matmul.Config())


def start_point(table: dict, kind: str, space: dict = SPACE) -> Candidate:
    """The knobs the table gives ``kind`` now (the search's first candidate)."""
    config = gemm_config(table, kind)
    rules = table.get(texture_key(kind), {}).get("rules", {})
    out: Candidate = {}
    for name in space:
        rule, knob = name.split(".", 1)
        if rule == "TextureMatmul":
            out[name] = int(config[knob])
        else:
            out[name] = int(rules.get(rule, {}).get(knob, RULE_KNOBS[rule][knob]))
    return out


def candidate_table(table: dict, kind: str, knobs: Candidate) -> dict:
    """``table`` with ``kind``'s texture entry set to ``knobs`` (everything else kept)."""
    out = json.loads(json.dumps(table))
    entry = out.setdefault(texture_key(kind), {})
    config = gemm_config(table, kind)
    rules: dict[str, dict[str, int]] = {}
    for name, value in sorted(knobs.items()):
        rule, knob = name.split(".", 1)
        if rule == "TextureMatmul":
            config[knob] = int(value)
        else:
            rules.setdefault(rule, {})[knob] = int(value)
    entry["config"] = config
    entry["rules"] = rules
    return out


@contextlib.contextmanager
def using_table(table: dict) -> Iterator[Path]:
    """Compile with ``table`` as the measured table (through ``TVM_SMARTMEM_MATMUL_CONFIGS``);
    the previous setting comes back afterwards."""
    from .. import switches

    with tempfile.TemporaryDirectory(prefix="smartmem_knobs_") as tmp:
        path = Path(tmp) / "matmul_configs.json"
        path.write_text(json.dumps(table, indent=1))
        with switches.applied({ENV: str(path)}):
            yield path


# -- the search ------------------------------------------------------------------------------


@dataclasses.dataclass
class SearchResult:
    best: Candidate
    best_score: float
    start: Candidate
    start_score: float
    history: list[dict]  # {"generation", "knobs", "score"} per measured candidate, in order

    @property
    def speedup(self) -> float:
        """The start point's score over the best one (> 1: the search found a faster one)."""
        if not math.isfinite(self.start_score) or not math.isfinite(self.best_score):
            return float("nan")
        return self.start_score / self.best_score


def _random(space: dict, rng: random.Random) -> Candidate:
    return {k: rng.choice(v) for k, v in space.items()}


def _neighbour(values: tuple[int, ...], value: int, rng: random.Random) -> int:
    i = values.index(value) if value in values else rng.randrange(len(values))
    j = min(len(values) - 1, max(0, i + rng.choice((-1, 1))))
    return values[j]


def genetic_search(space: dict[str, tuple[int, ...]], evaluate: Callable[[Candidate], float],
                   *, population: int = 8, generations: int = 4, mutation: float = 0.2,
                   seed: int = 0, start: Candidate | None = None,
                   log: Callable[[str], None] | None = None) -> SearchResult:
    """Minimise ``evaluate`` (a latency; ``inf`` for a candidate that fails) over ``space``.

    At most ``population * generations`` distinct candidates are evaluated, each once.  The
    start point (default: a random candidate) is always among them, so the result is never
    worse than it."""
    if population < 2 or generations < 1:
        raise ValueError("the search needs a population of 2 or more and 1 generation or more")
    rng = random.Random(seed)
    start = dict(start) if start is not None else _random(space, rng)
    unknown = set(start) ^ set(space)
    if unknown:
        raise ValueError(f"start point and search space disagree on {sorted(unknown)}")
    scores: dict[tuple, float] = {}
    history: list[dict] = []

    def score(c: Candidate, generation: int) -> float:
        k = _key(c)
        if k not in scores:
            scores[k] = float(evaluate(c))
            history.append({"generation": generation, "knobs": dict(c), "score": scores[k]})
            if log:
                best = min(scores.values())
                log(f"[gen {generation + 1}/{generations}, {len(scores)} measured] "
                    f"{_short(c)}: {scores[k]:.4g} (best {best:.4g})")
        return scores[k]

    def fresh(pool: list[Candidate]) -> Candidate | None:
        for _ in range(64):
            c = _random(space, rng)
            if _key(c) not in scores and all(_key(c) != _key(p) for p in pool):
                return c
        return None

    pool = [start]
    while len(pool) < population and (c := fresh(pool)) is not None:
        pool.append(c)
    for gen in range(generations):
        ranked = sorted(pool, key=lambda c: score(c, gen))
        if gen == generations - 1:
            break
        elite = ranked[:max(2, population // 2)]
        children: list[Candidate] = []
        for _ in range(64 * population):
            if len(elite) + len(children) >= population:
                break
            a, b = rng.sample(elite, 2)
            child = {k: (a if rng.random() < 0.5 else b)[k] for k in space}
            for k in space:
                if rng.random() < mutation:
                    child[k] = _neighbour(space[k], child[k], rng)
            if _key(child) not in scores and all(_key(child) != _key(c) for c in children):
                children.append(child)
        pool = elite + children
    best_key = min(scores, key=scores.get)
    return SearchResult(dict(best_key), scores[best_key], start, scores[_key(start)], history)


def _short(c: Candidate) -> str:
    return " ".join(f"{k.split('.', 1)[0].removeprefix('Texture')[:4]}.{k.split('.', 1)[1]}={v}"
                    for k, v in sorted(c.items()))


# -- scoring on a device ---------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    """A model to score candidates with: its module, weights, inputs and reference outputs."""

    name: str
    mod: object
    params: list
    inputs: list
    reference: list


def model_score(workloads: Sequence[Workload], target, runner,
                table: dict, kind: str, knobs: Candidate,
                log: Callable[[str], None] | None = None) -> float:
    """Geometric mean of the workloads' median latencies (ms) with ``knobs``; ``inf`` when a
    build fails, a launch fails or an output differs from its reference."""
    from .. import numerics
    from ..report import compile_with

    total = 0.0
    with using_table(candidate_table(table, kind, knobs)):
        for w in workloads:
            try:
                ex, _, _ = compile_with(w.mod, target, "smartmem")
                ok, err = numerics.compare(runner.outputs(ex, w.inputs, w.params), w.reference)
                if not ok:
                    if log:
                        log(f"  {w.name}: outputs differ from the reference ({err:.2e})")
                    return float("inf")
                total += math.log(runner.run(ex, w.inputs, w.params).median_ms)
            except Exception as exc:  # a candidate that does not build or run: never chosen
                if log:
                    log(f"  {w.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                return float("inf")
    return math.exp(total / len(workloads))


def cached(evaluate: Callable[[Candidate], float], db, target: str, device: str,
           models: str) -> Callable[[Candidate], float]:
    """``evaluate`` through the profile database: a candidate measured before on this device
    and these models is read back, a new one is recorded."""

    def run(knobs: Candidate) -> float:
        got = db.lookup_knobs(target, device, models, knobs)
        if got is not None:
            return got
        ms = evaluate(knobs)
        db.record_knobs(target, device, models, knobs, ms)
        return ms

    return run


def write_entry(path: Path, kind: str, knobs: Candidate, *, device: str, measured: str,
                speedup: float, base: dict | None = None) -> dict:
    """Write ``knobs`` into ``kind``'s texture entry of the table at ``path`` (created from the
    shipped table when absent) with where they were measured; returns the table."""
    table = base if base is not None else json.loads(
        (path if path.exists() else TABLE).read_text())
    out = candidate_table(table, kind, knobs)
    entry = out[texture_key(kind)]
    entry["rules_measured"] = measured
    entry["rules_device"] = device
    entry["rules_speedup"] = round(speedup, 3) if math.isfinite(speedup) else None
    path.write_text(json.dumps(out, indent=1) + "\n")
    load_table.cache_clear()
    return out
