"""``tvm-smartmem``: the command line, in the habits of tvmc users.

    tvm-smartmem compile MODEL --target T -o out.so [--report]
    tvm-smartmem run out.so [--device D] [--inputs file.npz|random] [--repeat N]
    tvm-smartmem report [MODEL ...] [--target T] [--json]
    tvm-smartmem tune MODEL --target T              (fusion decisions -> profile DB)
    tvm-smartmem tune-schedules [MODEL ...] --target opencl-texture [--out table.json]
    tvm-smartmem zoo [--models a,b] [--out DIR]
    tvm-smartmem targets | devices

MODEL is a path to an ONNX file or ``builtin:NAME`` (bert_layer, swin_block, small_cnn).
``compile`` writes three files: the library (``out.so``), its weights (``out.params.npz``) and
a description (``out.json``: target, pipeline, input signature, statistics).  ``run`` finds the
two side files next to the library.

User mistakes print ``error: <one line>`` and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import ShapeMismatchError, SmartMemError

EXIT_USER_ERROR = 2


def _parse_shapes(items: Sequence[str] | None) -> dict[str, list[int | str]] | None:
    """``--shape name:1,3,224,224`` (repeatable); a non-numeric dim is symbolic."""
    if not items:
        return None
    out: dict[str, list[int | str]] = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        if not sep or not name or not dims:
            raise ShapeMismatchError(f"--shape expects NAME:D1,D2,..., got '{item}'")
        out[name] = [int(d) if d.strip().lstrip("-").isdigit() else d.strip()
                     for d in dims.split(",")]
    return out


def _side_files(lib: Path) -> tuple[Path, Path]:
    return lib.with_suffix(".params.npz"), lib.with_suffix(".json")


# -- compile ---------------------------------------------------------------------------------


def cmd_compile(args: argparse.Namespace) -> int:
    from . import frontend, targets
    from .report import compile_with, resolve_model

    name, proto = resolve_model(args.model)
    tgt = targets.get(args.target)
    mod, params = frontend.from_onnx(proto, shape_dict=_parse_shapes(args.shape))
    ex, stats, secs = compile_with(mod, tgt, args.pipeline)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        ex.export_library(str(out))
    except Exception as err:
        raise SmartMemError(
            f"cannot export {out}: {frontend.summarize_tvm_error(err)}"
        ) from None
    params_path, meta_path = _side_files(out)
    np.savez(params_path, **{f"param_{i:05d}": p for i, p in enumerate(params)})
    meta = {
        "model": name,
        "target_name": args.target,
        "target": str(tgt),
        "device": targets.device_of(tgt),
        "pipeline": args.pipeline,
        "inputs": frontend.input_signature(mod),
        "num_params": len(params),
        "stats": stats.summary(),
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    print(f"wrote {out} ({out.stat().st_size} bytes), {params_path.name} ({len(params)} "
          f"weights), {meta_path.name}; compiled in {secs:.1f} s")
    if args.report:
        for key, value in stats.summary().items():
            print(f"  {key:32s} {value}")
    return 0


# -- run -------------------------------------------------------------------------------------


def _load_inputs(spec: str, signature: list[dict], seed: int) -> list[np.ndarray]:
    from .frontend import check_inputs

    if spec == "random":
        rng = np.random.default_rng(seed)
        arrays = []
        for s in signature:
            if s["shape"] is None or any(not isinstance(d, int) for d in s["shape"]):
                raise ShapeMismatchError(
                    f"input '{s['name']}' has symbolic shape {s['shape']}: give --inputs file.npz"
                )
            if np.issubdtype(np.dtype(s["dtype"]), np.integer):
                arrays.append(rng.integers(0, 8, size=s["shape"]).astype(s["dtype"]))
            else:
                arrays.append(rng.standard_normal(s["shape"]).astype(s["dtype"]))
    else:
        path = Path(spec)
        if not path.exists():
            raise SmartMemError(f"inputs file not found: {path}")
        try:
            data = np.load(path)
        except Exception as err:
            raise SmartMemError(f"cannot read inputs {path}: {err}") from None
        names = [s["name"] for s in signature]
        if all(n in data for n in names):
            arrays = [data[n] for n in names]
        elif len(data.files) == len(names):
            arrays = [data[k] for k in data.files]
        else:
            raise ShapeMismatchError(
                f"{path} holds {sorted(data.files)}; the model takes {names}"
            )
    check_inputs(signature, arrays)
    return arrays


def _runner_for(device: str, args: argparse.Namespace):
    """LocalRunner for cpu / cuda / opencl, RPCRunner for rpc://host:port/key[/device]."""
    from .measure import LocalRunner, RPCRunner

    protocol = {"repeat": args.repeat, "number": args.number, "warmup": args.warmup}
    if device.startswith("rpc://"):
        parts = device[len("rpc://"):].split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise SmartMemError(f"an RPC device is rpc://host:port/key[/device], got '{device}'")
        remote_kind = parts[2] if len(parts) == 3 else args.meta_device
        return RPCRunner(parts[0], parts[1], device=remote_kind, **protocol)
    return LocalRunner(device, **protocol)


def cmd_run(args: argparse.Namespace) -> int:
    from .measure import load_runnable

    lib = Path(args.module)
    params_path, meta_path = _side_files(lib)
    if not lib.exists():
        raise SmartMemError(f"compiled module not found: {lib}")
    if not meta_path.exists() or not params_path.exists():
        raise SmartMemError(
            f"{lib} lacks its side files {params_path.name} / {meta_path.name} "
            "(written by `tvm-smartmem compile`)"
        )
    meta = json.loads(meta_path.read_text())
    device = args.device or meta["device"]
    args.meta_device = meta["device"]
    if not device.startswith("rpc://") and device != meta["device"]:
        raise SmartMemError(
            f"{lib} was compiled for {meta['target_name']} (device {meta['device']}), "
            f"not for device {device}"
        )
    inputs = _load_inputs(args.inputs, meta["inputs"], args.seed)
    with np.load(params_path) as data:
        params = [data[k] for k in sorted(data.files)]
    runner = _runner_for(device, args)
    module = lib if device.startswith("rpc://") else load_runnable(lib)
    result = runner.run(module, inputs, params, profile=args.profile)
    if args.json:
        print(result.to_json())
    else:
        print(result.summary())
    return 0


# -- report ----------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from . import targets
    from .report import compare_pipelines, format_table, resolve_model

    tgt = targets.get(args.target)
    check = not args.no_check and _device_available(targets.device_of(tgt))
    models = args.model or ["builtin:bert_layer", "builtin:swin_block", "builtin:small_cnn"]
    results = {}
    failed = False
    for spec in models:
        name, proto = resolve_model(spec)
        reports = compare_pipelines(proto, tgt, shape_dict=_parse_shapes(args.shape),
                                    check=check, seed=args.seed)
        results[name] = {k: r.to_dict() for k, r in reports.items()}
        failed |= any(r.matches_reference is False for r in reports.values())
        if not args.json:
            print(format_table(name, args.target, reports))
            print()
    if not check and not args.json:
        print(f"(numerics not checked: {'--no-check' if args.no_check else 'no local device'}"
              f" for {args.target})")
    if args.json:
        print(json.dumps(results[name] if len(results) == 1 else results, indent=2))
    return 1 if failed else 0


def _device_available(kind: str) -> bool:
    from .measure import get_device

    try:
        get_device(kind)
    except SmartMemError:
        return False
    return True


# -- zoo -------------------------------------------------------------------------------------


def cmd_tune(args: argparse.Namespace) -> int:
    from . import frontend, targets
    from .cost.db import ProfileDB, default_path
    from .cost.tune import tune
    from .report import resolve_model

    tgt = targets.get(args.target)
    name, proto = resolve_model(args.model)
    mod, _ = frontend.from_onnx(proto, shape_dict=_parse_shapes(args.shape))
    device = args.device or targets.device_of(tgt)
    args.meta_device = targets.device_of(tgt)
    runner = _runner_for(device, args)
    db_path = Path(args.db) if args.db else default_path()
    db = ProfileDB(db_path)
    results = tune(mod, tgt, runner, db, rounds=args.rounds, limit=args.limit, seed=args.seed)
    measured = [r for r in results if r.error is None]
    wins = sum(bool(r.fuse_wins) for r in measured)
    print(f"{name}: {len(measured)} candidate(s) measured on {device} ({wins} faster fused, "
          f"{len(measured) - wins} faster split), {len(results) - len(measured)} skipped; "
          f"{len(db)} entries in {db_path}")
    if db_path != default_path():
        print(f"compile with TVM_SMARTMEM_PROFILE_DB={db_path} to use them")
    return 0


def _device_label(device: str) -> str:
    """A name for the device measurements are recorded under (its model where known)."""
    if device.startswith("opencl"):
        from .runtime import opencl

        devices = opencl.describe().get("devices") or []
        if devices:
            return f"opencl:{devices[0]['name']}"
    return device


def cmd_tune_schedules(args: argparse.Namespace) -> int:
    from . import frontend, models, numerics, pipeline, targets
    from .cost.db import ProfileDB, default_path
    from .report import resolve_model
    from .tir import knob_search as ks
    from .tir.matmul import load_table, target_key

    tgt = targets.get(args.target)
    key = target_key(tgt)
    if pipeline.target_kind(tgt) != "opencl-texture" or key is None:
        raise SmartMemError(
            f"tune-schedules searches the knobs of the texture rules of a desktop OpenCL "
            f"texture target (opencl-texture); '{args.target}' has none to search")
    if args.population < 2 or args.generations < 1:
        raise SmartMemError("tune-schedules needs --population 2 or more and --generations 1 "
                            f"or more (got {args.population} and {args.generations})")
    try:
        table = json.loads(json.dumps(load_table()))
    except ValueError as err:  # a hand-edited table: name the problem, no traceback
        raise SmartMemError(str(err)) from None
    device = args.device or targets.device_of(tgt)
    args.meta_device = targets.device_of(tgt)
    runner = _runner_for(device, args)
    workloads = []
    for spec in args.models or ["builtin:bert_layer", "builtin:small_cnn"]:
        name, proto = resolve_model(spec)
        mod, params = frontend.from_onnx(proto)
        inputs = models.random_inputs(proto, seed=args.seed)
        workloads.append(ks.Workload(name, mod, params, list(inputs.values()),
                                     numerics.onnxruntime_reference(proto, inputs)))
    start = ks.start_point(table, key)
    db_path = Path(args.db) if args.db else default_path()
    db = ProfileDB(db_path)
    label = _device_label(device)
    names = ",".join(w.name for w in workloads)

    def log(line: str) -> None:
        print(line, flush=True)

    def evaluate(knobs):
        return ks.model_score(workloads, tgt, runner, table, key, knobs, log=log)

    print(f"searching {len(ks.SPACE)} texture-rule knobs on {label} with {names} "
          f"(population {args.population}, {args.generations} generations)", flush=True)
    result = ks.genetic_search(ks.SPACE, ks.cached(evaluate, db, args.target, label, names),
                               population=args.population, generations=args.generations,
                               seed=args.seed, start=start, log=log)
    print(f"start {result.start_score:.4g} ms, best {result.best_score:.4g} ms "
          f"({result.speedup:.3f}x), {len(result.history)} candidates; "
          f"{len(db)} fusion entries and the knob measurements in {db_path}")
    if args.results:
        Path(args.results).write_text(json.dumps(
            {"target": args.target, "device": label, "models": names,
             "protocol": {"repeat": args.repeat, "number": args.number, "warmup": args.warmup},
             "population": args.population, "generations": args.generations,
             "seed": args.seed, "start": result.start, "start_ms": result.start_score,
             "best": result.best, "best_ms": result.best_score, "history": result.history},
            indent=1))
        print(f"wrote {args.results}")
    if args.out:
        ks.write_entry(Path(args.out), key, result.best, device=label,
                       measured=args.results or f"tvm-smartmem tune-schedules on {label}",
                       speedup=result.speedup, base=table)
        print(f"wrote {args.out}: compile with TVM_SMARTMEM_MATMUL_CONFIGS={args.out} to use it")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from . import zoo

    if args.list:
        for name, m in zoo.MODELS.items():
            print(f"{name:16s} {m.family:17s} {m.source}{'' if m.default else '  (opt-in)'}")
        return 0
    cache = Path(args.out) if args.out else zoo.default_cache()
    entries = zoo.build_zoo(args.models, cache=cache, force=args.force,
                            log=lambda line: print(line, flush=True))
    print(f"{len(entries)} model(s) in {cache} (manifest.json)")
    return 0


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    cfg = bench.BenchConfig(
        models=_split(args.models), targets=_split(args.targets) or ["llvm"],
        pipelines=_split(args.pipelines) or list(bench.DEFAULT_PIPELINES),
        ablation=args.ablation, repeat=args.repeat, number=args.number, warmup=args.warmup,
        check=not args.no_check, peers=not args.no_peers, seed=args.seed, zoo_cache=args.zoo)
    if not cfg.models:
        raise SmartMemError("--models is empty: name zoo models, builtin:NAME or .onnx files")
    doc = bench.run_suite(cfg, log=lambda line: print(line, flush=True))
    paths = bench.write_results(doc, args.out, args.name, bench.command_line())
    print("\n" + paths[1].read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    failed = [r for r in doc["results"] if "error" in r or r.get("matches_onnxruntime") is False]
    return 1 if failed else 0


# -- listings --------------------------------------------------------------------------------


def cmd_targets(_args: argparse.Namespace) -> int:
    from . import targets

    for name, spec in targets.KNOWN.items():
        print(f"{name:16s} device {spec.device:7s} {spec.description}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    import tvm

    from .runtime import opencl

    info = opencl.describe()
    if args.json:
        print(json.dumps({"cpu": True, "cuda": bool(tvm.device("cuda", 0).exist), "opencl": info},
                         indent=2))
        return 0
    print("cpu      available")
    cuda = tvm.device("cuda", 0)
    print("cuda     " + (f"available ({cuda.device_name})" if cuda.exist else "not available"))
    if info.get("devices"):
        for i, d in enumerate(info["devices"]):
            print(f"opencl:{i} available ({d['name']}, {d['type']}, platform {info['platform']}, "
                  f"images {'x'.join(str(v) for v in d['image2d_max'])}, "
                  f"fp16 {'yes' if d['fp16'] else 'no'})")
    else:
        print(f"opencl   not available: {info.get('error') or 'no device'}")
    if info.get("loader"):
        print(f"         OpenCL loader {info['loader']}; platforms seen: "
              f"{', '.join(p['name'] for p in info.get('platforms', [])) or 'none'}")
    return 0


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, targets

    p = argparse.ArgumentParser(
        prog="tvm-smartmem",
        description="SmartMem / DNNFusion layout and fusion optimisations for Apache TVM.",
    )
    p.add_argument("--version", action="version", version=f"tvm-smartmem {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    target_help = f"target name ({', '.join(targets.names())})"

    c = sub.add_parser("compile", help="compile a model to a library")
    c.add_argument("model", help="ONNX file or builtin:NAME")
    c.add_argument("--target", default="llvm", help=target_help)
    c.add_argument("-o", "--output", required=True, help="output library (.so)")
    c.add_argument("--pipeline", choices=["smartmem", "baseline"], default="smartmem")
    c.add_argument("--shape", action="append", help="input shape override NAME:D1,D2,...")
    c.add_argument("--report", action="store_true", help="print the statistics")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="run and time a compiled library")
    r.add_argument("module", help="library written by `compile`")
    r.add_argument("--device", help="cpu, cuda, opencl or rpc://host:port/key[/device] "
                   "(default: the target's device)")
    r.add_argument("--inputs", default="random", help="random, or an .npz file")
    r.add_argument("--repeat", type=int, default=10, help="timed repeats (default 10)")
    r.add_argument("--number", type=int, default=5, help="calls per repeat (default 5)")
    r.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls (default 3)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--profile", action="store_true", help="add a per-kernel profile")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="statistics: TVM default pipeline vs smartmem")
    rep.add_argument("model", nargs="*", help="ONNX files or builtin:NAME (default: built-ins)")
    rep.add_argument("--target", default="llvm", help=target_help)
    rep.add_argument("--shape", action="append", help="input shape override NAME:D1,D2,...")
    rep.add_argument("--json", action="store_true",
                     help='one JSON object {"baseline": {...}, "smartmem": {...}}')
    rep.add_argument("--no-check", action="store_true",
                     help="skip running both builds against ONNX Runtime")
    rep.add_argument("--seed", type=int, default=0)
    rep.set_defaults(func=cmd_report)

    tu = sub.add_parser("tune", help="measure the fusion planner's uncertain (yellow) "
                        "decisions into the profile database")
    tu.add_argument("model", help="ONNX file or builtin:NAME")
    tu.add_argument("--target", default="llvm", help=target_help)
    tu.add_argument("--device", help="cpu, cuda, opencl or rpc://host:port/key[/device] "
                    "(default: the target's device)")
    tu.add_argument("--db", help="profile database (default: <cache>/profile.sqlite, which "
                    "the smartmem pipeline then uses)")
    tu.add_argument("--shape", action="append", help="input shape override NAME:D1,D2,...")
    tu.add_argument("--rounds", type=int, default=2, help="plan / measure rounds (default 2)")
    tu.add_argument("--limit", type=int, help="measure at most this many candidates")
    tu.add_argument("--repeat", type=int, default=5, help="timed repeats (default 5)")
    tu.add_argument("--number", type=int, default=10, help="calls per repeat (default 10)")
    tu.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls (default 2)")
    tu.add_argument("--seed", type=int, default=0)
    tu.set_defaults(func=cmd_tune)

    ts = sub.add_parser("tune-schedules", help="search the texture schedule rules' knobs on "
                        "a device (genetic search scored by whole models)")
    ts.add_argument("models", nargs="*", help="ONNX files or builtin:NAME (default: "
                    "builtin:bert_layer builtin:small_cnn)")
    ts.add_argument("--target", default="opencl-texture", help=target_help)
    ts.add_argument("--device", help="opencl or rpc://host:port/key[/device] "
                    "(default: the target's device)")
    ts.add_argument("--population", type=int, default=8, help="candidates per generation")
    ts.add_argument("--generations", type=int, default=4)
    ts.add_argument("--db", help="profile database (default: <cache>/profile.sqlite)")
    ts.add_argument("--out", help="write the table with the best knobs here (use it through "
                    "TVM_SMARTMEM_MATMUL_CONFIGS)")
    ts.add_argument("--results", help="write the search's history (JSON) here")
    ts.add_argument("--repeat", type=int, default=5, help="timed repeats (default 5)")
    ts.add_argument("--number", type=int, default=10, help="calls per repeat (default 10)")
    ts.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls (default 2)")
    ts.add_argument("--seed", type=int, default=0)
    ts.set_defaults(func=cmd_tune_schedules)

    z = sub.add_parser("zoo", help="export the model zoo to ONNX (needs the [zoo] extra)")
    z.add_argument("--models", help="comma-separated names (default: the 21 default models)")
    z.add_argument("--out", help="cache directory (default: ~/.cache/tvm_smartmem/zoo)")
    z.add_argument("--force", action="store_true", help="export again even if cached")
    z.add_argument("--list", action="store_true", help="list the models and exit")
    z.set_defaults(func=cmd_zoo)

    b = sub.add_parser("bench", help="benchmark suite: models x targets x pipelines, with "
                       "statistics, latency, ONNX Runtime agreement, tables and plots")
    b.add_argument("--models", required=True,
                   help="comma-separated zoo names (exported with `zoo`), builtin:NAME or "
                   ".onnx files")
    b.add_argument("--targets", default="llvm", help="comma-separated " + target_help)
    b.add_argument("--pipelines", default="baseline,smartmem",
                   help="comma-separated: baseline, smartmem, smartmem:STAGE[+STAGE] "
                   "(stages: fusion, layout, tir, rewrite, weights, schedule)")
    b.add_argument("--ablation", action="store_true",
                   help="add the cumulative ablation: smartmem with fusion, +layout, +tir, "
                   "+rewrite, +weights (the full pipeline adds the measured GEMM knobs)")
    b.add_argument("--repeat", type=int, default=5, help="timed repeats (default 5)")
    b.add_argument("--number", type=int, default=3, help="calls per repeat (default 3)")
    b.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls (default 2)")
    b.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime comparison")
    b.add_argument("--no-peers", action="store_true", help="do not time ONNX Runtime")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--zoo", help="zoo cache directory (default: ~/.cache/tvm_smartmem/zoo)")
    b.add_argument("--out", default="benchmarks/results", help="results directory")
    b.add_argument("--name", default="bench", help="results file stem (default: bench)")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("targets", help="list the named targets")
    t.set_defaults(func=cmd_targets)
    d = sub.add_parser("devices", help="list the devices this machine can run on")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_devices)
    return p


def _one_line_warnings() -> None:
    """Warnings as ``warning: <message>`` lines, not Python's file:line: source dump."""
    import warnings

    warnings.formatwarning = lambda message, *_a, **_k: f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    _one_line_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SmartMemError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
