"""The benchmark suite: models x targets x pipelines, with statistics, latency and numerics.

``tvm-smartmem bench`` and ``benchmarks/run.py`` call :func:`run_suite`.  For every model and
target it compiles TVM's default fused pipeline, the smartmem pipeline and (with ``ablation``)
smartmem with one stage at a time switched on; it records the statistics of what each pipeline
produced (kernels, data-movement kernels, bytes they move), the compile time, the latency
through :class:`~tvm_smartmem.measure.LocalRunner` where the target's device exists here, and
the agreement with ONNX Runtime.  ONNX Runtime itself is timed as a peer on the CPU with the
same protocol.  Results go to ``<out>/<name>.json`` (with machine, versions and git commit),
``<name>.md`` and ``<name>.png``.

A target whose device is not on this machine (``cuda`` on a CPU box) still gets statistics and
compile times; its latency is left empty with the reason, and ``benchmarks/gpu_machine.py``
is the route that measures it on the GPU machine.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from . import frontend, models, numerics, targets
from .errors import CompilationError, DeviceNotFoundError
from .pipeline import ABLATION

DEFAULT_PIPELINES = ("baseline", "smartmem")


@dataclasses.dataclass
class BenchConfig:
    """What one suite run covers, and its timing protocol."""

    models: list[str]
    targets: list[str] = dataclasses.field(default_factory=lambda: ["llvm"])
    pipelines: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_PIPELINES))
    ablation: bool = False
    repeat: int = 5
    number: int = 3
    warmup: int = 2
    check: bool = True
    peers: bool = True
    seed: int = 0
    zoo_cache: str | None = None

    def all_pipelines(self) -> list[str]:
        """The pipelines in table order: the cumulative ablation steps sit between the
        baseline and the full smartmem pipeline so the table reads as a progression."""
        extra = [f"smartmem:{s}" for s in ABLATION] if self.ablation else []
        head = [p for p in self.pipelines if p != "smartmem"]
        tail = ["smartmem"] if "smartmem" in self.pipelines else []
        return [*head, *[p for p in extra if p not in head], *tail]


# -- models ----------------------------------------------------------------------------------


def load_model(spec: str, zoo_cache: str | None = None) -> tuple[str, onnx.ModelProto]:
    """``builtin:NAME``, a path to an ``.onnx`` file, or a zoo model name (exported already)."""
    from . import zoo
    from .report import resolve_model

    if spec.startswith("builtin:") or spec.endswith(".onnx") or Path(spec).exists():
        return resolve_model(spec)
    name = zoo.resolve(spec)[0]
    path = zoo.model_path(name, Path(zoo_cache) if zoo_cache else None)
    return name, frontend.load_onnx(path)


# -- one measurement -------------------------------------------------------------------------


def _time_onnxruntime(model: onnx.ModelProto, inputs: dict, cfg: BenchConfig) -> dict:
    """ONNX Runtime on the CPU, timed with the runners' protocol (warm-up, repeat x number)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    for _ in range(cfg.warmup):
        sess.run(None, inputs)
    samples = []
    for _ in range(cfg.repeat):
        t0 = time.perf_counter()
        for _ in range(cfg.number):
            sess.run(None, inputs)
        samples.append((time.perf_counter() - t0) / cfg.number * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples),
            "max_ms": max(samples), "samples_ms": samples}


def _runner_for(target: str, cfg: BenchConfig):
    """A LocalRunner for ``target``'s device, or (None, why) when the device is not here."""
    from .measure import LocalRunner

    device = targets.device_of(targets.resolve(target))
    try:
        return LocalRunner(device, repeat=cfg.repeat, number=cfg.number,
                           warmup=cfg.warmup), None
    except DeviceNotFoundError as err:
        return None, f"{err} (measure it with benchmarks/gpu_machine.py)"


def bench_one(model: str, mod, target: str, pipeline: str, inputs: dict, params: list,
              ref, runner, why_not) -> dict:
    """One (model, target, pipeline) row: statistics, compile time, latency, numerics."""
    from .report import compile_with_facts

    row: dict = {"model": model, "target": target, "pipeline": pipeline}
    try:
        ex, stats, secs, facts = compile_with_facts(mod, targets.resolve(target), pipeline)
    except CompilationError as err:
        row["error"] = str(err)
        return row
    row.update(stats.summary())
    row.update(compile_seconds=round(secs, 2), flops_removed=facts.get("flops_removed", 0),
               rewrites=facts.get("rewrites", {}),
               combined_matmuls=facts.get("combined_matmuls", 0),
               split_gemms=facts.get("split_gemms", 0),
               weight_layout=facts.get("weight_layout"))
    if runner is None:
        row["latency"] = None
        row["not_measured"] = why_not
        return row
    if ref is not None:
        outs = runner.outputs(ex, list(inputs.values()), params)
        ok, err = numerics.compare(outs, ref)
        row.update(matches_onnxruntime=ok, max_error_vs_onnxruntime=err)
    res = runner.run(ex, list(inputs.values()), params)
    row["latency"] = {"device": res.device, "device_name": res.device_name,
                      "median_ms": res.median_ms, "min_ms": res.min_ms, "max_ms": res.max_ms,
                      "samples_ms": res.samples_ms}
    return row


# -- the suite -------------------------------------------------------------------------------


def git_commit() -> str:
    """The commit of this checkout (results files record it), ``unknown`` outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def env_prefix() -> str:
    """The ``TVM_SMARTMEM_*`` switches of this process as a shell prefix (``A=1 B=off ``), so a
    results file's reproduce command builds the same configuration.  Variables that name
    places (profile database, cache, zoo, OpenCL library) are left out: not choices of the
    pipeline, and private paths."""
    import os

    places = {"TVM_SMARTMEM_PROFILE_DB", "TVM_SMARTMEM_CACHE", "TVM_SMARTMEM_ZOO",
              "TVM_SMARTMEM_OPENCL_LIB"}
    switches = sorted((k, v) for k, v in os.environ.items()
                      if k.startswith("TVM_SMARTMEM_") and k not in places)
    return "".join(f"{k}={v} " for k, v in switches)


def machine_info() -> dict:
    """Where and with what the figures were taken (every results file records it)."""
    import tvm

    versions = {"tvm": tvm.__version__, "numpy": np.__version__, "onnx": onnx.__version__,
                "python": platform.python_version()}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return {"host": platform.node(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "cpus": _cpu_count(), "versions": versions, "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def run_suite(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Run every (model, target, pipeline); returns the results document."""
    pipelines = cfg.all_pipelines()
    for t in cfg.targets:
        targets.resolve(t)  # an unknown target fails before any compile
    loaded = [load_model(m, cfg.zoo_cache) for m in cfg.models]
    total = len(loaded) * len(cfg.targets) * len(pipelines)
    rows: list[dict] = []
    peers: list[dict] = []
    runners = {t: _runner_for(t, cfg) for t in cfg.targets}
    step = 0
    for name, proto in loaded:
        inputs = models.random_inputs(proto, seed=cfg.seed)
        mod, params = frontend.from_onnx(proto)
        ref = numerics.onnxruntime_reference(proto, inputs) if cfg.check else None
        if cfg.peers:
            ort_row = {"model": name, "peer": "onnxruntime-cpu",
                       **_time_onnxruntime(proto, inputs, cfg)}
            peers.append(ort_row)
            log(f"{name}: ONNX Runtime (cpu) {ort_row['median_ms']:.3f} ms")
        for target in cfg.targets:
            runner, why_not = runners[target]
            for pipeline in pipelines:
                step += 1
                t0 = time.perf_counter()
                row = bench_one(name, mod, target, pipeline, inputs, params, ref, runner,
                                why_not)
                rows.append(row)
                log(f"[{step}/{total}] {_progress(row)} ({time.perf_counter() - t0:.0f} s)")
    return {"machine": machine_info(), "config": dataclasses.asdict(cfg),
            "pipelines": pipelines, "results": rows, "peers": peers}


def _progress(row: dict) -> str:
    head = f"{row['model']} {row['target']} {row['pipeline']}:"
    if "error" in row:
        return f"{head} FAILED {row['error']}"
    lat = row.get("latency")
    text = (f"{head} {row['kernels']} kernels, {row['data_movement_kernels']} data-movement, "
            f"compile {row['compile_seconds']:.1f} s")
    if lat:
        text += f", {lat['median_ms']:.3f} ms"
    if row.get("matches_onnxruntime") is not None:
        text += ", matches ORT" if row["matches_onnxruntime"] else \
            f", MISMATCH vs ORT (max error {row['max_error_vs_onnxruntime']:.2e})"
    return text


# -- tables and plots ------------------------------------------------------------------------


def _find(rows: list[dict], model: str, target: str, pipeline: str) -> dict | None:
    for r in rows:
        if (r["model"], r["target"], r["pipeline"]) == (model, target, pipeline):
            return r
    return None


def speedup(rows: list[dict], model: str, target: str, pipeline: str) -> float | None:
    """Baseline median latency / ``pipeline``'s, when both were measured."""
    base, ours = _find(rows, model, target, "baseline"), _find(rows, model, target, pipeline)
    if not base or not ours or not base.get("latency") or not ours.get("latency"):
        return None
    return base["latency"]["median_ms"] / ours["latency"]["median_ms"]


def geomean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def _cell(v, fmt: str = "{}") -> str:
    return "n/a" if v is None else fmt.format(v)


def markdown(doc: dict, command: str) -> str:
    """The results as a markdown table, with the machine and the command that made them."""
    m = doc["machine"]
    rows, pipelines = doc["results"], doc["pipelines"]
    lines = [
        "# tvm-smartmem benchmark suite", "",
        f"Machine: {m['host']} ({m['processor']}, {m['cpus']} cpus), TVM {m['versions']['tvm']}, "
        f"commit `{m['git_commit']}`, {m['date']}.",
        f"Protocol: {doc['config']['warmup']} warm-up calls, median of "
        f"{doc['config']['repeat']} x {doc['config']['number']} calls. fp32, batch 1.", "",
        "| model | target | pipeline | kernels | data-movement kernels | bytes moved | "
        "compile (s) | latency (ms) | speedup vs TVM | max error vs ORT |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['target']} | {r['pipeline']} | failed: "
                         f"{r['error']} |||||||")
            continue
        lat = r.get("latency")
        sp = speedup(rows, r["model"], r["target"], r["pipeline"])
        err = r.get("max_error_vs_onnxruntime")
        ok = r.get("matches_onnxruntime")
        lines.append(
            f"| {r['model']} | {r['target']} | {r['pipeline']} | {r['kernels']} | "
            f"{r['data_movement_kernels']} | {r['data_movement_bytes']} | "
            f"{r['compile_seconds']:.1f} | {_cell(lat and lat['median_ms'], '{:.3f}')} | "
            f"{_cell(sp, '{:.2f}x')} | "
            f"{_cell(err, '{:.1e}')}{'' if ok is None else (' ok' if ok else ' MISMATCH')} |")
    for target in doc["config"]["targets"]:
        for p in pipelines[1:]:
            g = geomean([speedup(rows, mod, target, p) or 0 for mod in _models(rows)])
            if g:
                lines.append(f"\nGeomean speedup of {p} over TVM's default on {target}: "
                             f"**{g:.2f}x**")
    if doc["peers"]:
        lines += ["", "| model | peer | latency (ms) |", "|---|---|---|"]
        lines += [f"| {p['model']} | {p['peer']} | {p['median_ms']:.3f} |" for p in doc["peers"]]
    skipped = {r["target"]: r["not_measured"] for r in rows if r.get("not_measured")}
    for target, why in skipped.items():
        lines.append(f"\nLatency on {target} not measured here: {why}")
    lines += ["", f"Reproduce: `{command}`"]
    return "\n".join(lines) + "\n"


def _models(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None (with a note) when matplotlib
    is not installed: the benchmark scripts then write their tables without a plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    return plt


def plot(doc: dict, path: Path) -> None:
    """Two panels: speedup over TVM's default per model, kernel launches per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, pipelines = doc["results"], doc["pipelines"]
    names = _models(rows)
    series = [(t, p) for t in doc["config"]["targets"] for p in pipelines]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(names) + 4), 4.5))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(names))
    for i, (t, p) in enumerate(series):
        sp = [speedup(rows, m, t, p) or 0 for m in names]
        ax1.bar(x + i * width, sp, width, label=f"{p} ({t})")
        kc = [(_find(rows, m, t, p) or {}).get("kernels", 0) for m in names]
        ax2.bar(x + i * width, kc, width, label=f"{p} ({t})")
    ax1.axhline(1.0, color="black", lw=0.8)
    for ax, title in ((ax1, "speedup over TVM default (x)"), (ax2, "kernel launches")):
        ax.set_xticks(x + width * (len(series) - 1) / 2)
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_title(title)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(doc: dict, out_dir: str | Path, name: str, command: str) -> list[Path]:
    """``<name>.json``, ``<name>.md`` and ``<name>.png`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = dict(doc, command=command)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    paths[0].write_text(json.dumps(doc, indent=1, default=_jsonable))
    paths[1].write_text(markdown(doc, command))
    plot(doc, paths[2])
    return paths


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def command_line() -> str:
    return " ".join(["tvm-smartmem bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] \
        else " ".join(["python", *sys.argv])


__all__ = ["BenchConfig", "load_model", "run_suite", "write_results"]
