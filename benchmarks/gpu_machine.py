"""Measure models on the GPU machine (H100) through CUDA and NVIDIA OpenCL, in one device call.

The GPU machine runs Python 3.12 with PyTorch but no TVM, reaches no network, and receives at
most 64 MiB per call.  So the work splits in three steps:

1. ``prepare`` (here, on the CPU machine): import each zoo model, compile it with each pipeline
   for ``cuda`` (sm_90) and for ``opencl``, export the libraries, and write a bundle under
   ``.device/bundle`` (git-ignored): the libraries, a weight *spec* per model (shapes and
   statistics: the weights themselves are hundreds of MB and are regenerated there from a seed),
   the model graph with its weights turned into inputs (for the ONNX Runtime reference), the
   runtime-only TVM package (no ``libtvm_compiler.so``), the cp312 ``apache-tvm-ffi`` wheel, and
   an ICD file naming ``libnvidia-opencl.so.1``.
2. ``measure`` (there, through the device tool, ``carry=[".device/bundle"]``)::

       python3 benchmarks/gpu_machine.py measure --bundle .device/bundle --out $OUT --peers

   sets up the runtime-only TVM, builds the project's OpenCL runtime with the machine's g++,
   loads every library on ``cuda`` and on ``opencl`` (NVIDIA's platform), checks outputs against
   ONNX Runtime with the same regenerated weights, times them with the project's runner protocol
   and, with ``--peers``, times PyTorch eager and ``torch.compile`` on the same architectures.
   It writes ``$OUT/gpu_results.json``.
3. ``report`` (here): turns that JSON into ``benchmarks/results/<name>.json``, a markdown table and
   a plot.

CONTRIBUTING.md ("Measuring on the GPU machine") walks through it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / ".device" / "bundle"
TARGETS = ("cuda", "opencl")
FFI_VERSION = "0.1.14.post1"
SEED = 1234


# =============================================================================================
# prepare (CPU machine, full TVM)
# =============================================================================================


#: A weight with at most this many distinct values and elements travels exactly: a causal
#: mask (0 and float32's minimum) regenerated from its mean and spread overflows to inf and
#: makes every output NaN -- and NaN matched NaN (SD's text encoder, until this).
EXACT_DISTINCT, EXACT_ELEMENTS = 16, 1 << 18


def _weight_spec(params) -> list[dict]:
    """Shapes and statistics of each weight: enough to regenerate look-alike random weights;
    masks, index tables and other few-valued tensors exactly (base64 of their bytes)."""
    import base64

    import numpy as np

    out = []
    for p in params:
        a = np.asarray(p)
        wide = a.astype(np.float64)
        spec = {"shape": list(a.shape), "dtype": str(a.dtype),
                "mean": float(wide.mean()) if a.size else 0.0,
                "std": float(wide.std()) if a.size else 0.0,
                "nonnegative": bool(a.size and wide.min() >= 0)}
        if a.size <= EXACT_ELEMENTS and len(np.unique(a)) <= EXACT_DISTINCT:
            spec["exact"] = base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()
        elif not np.isfinite(abs(spec["mean"]) + 8 * spec["std"]) or \
                abs(spec["mean"]) + 8 * spec["std"] > float(np.finfo(np.float32).max):
            raise ValueError(f"weight of shape {spec['shape']} cannot be regenerated from its "
                             f"statistics (mean {spec['mean']:.3g}, std {spec['std']:.3g})")
        out.append(spec)
    return out


def _graph_with_weight_inputs(model, weight_names: list[str]):
    """The ONNX graph with its weights turned into graph inputs (a few hundred KB)."""
    import onnx

    graph_weights = {i.name: i for i in model.graph.initializer if i.name in set(weight_names)}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [i for i in out.graph.initializer if i.name not in graph_weights]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    for name in weight_names:
        init = graph_weights[name]
        out.graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type,
                                                                  list(init.dims)))
    return out


def parse_variants(spec: str) -> dict[str, dict[str, str]]:
    """``label:VAR=VALUE,VAR=VALUE;label2:...`` -> {label: {VAR: VALUE}}: extra smartmem builds
    compiled with those pipeline switches (``TVM_SMARTMEM_*``; they are read at compile time),
    named ``smartmem_<label>-<target>`` -- the naming ``merge`` gives variants -- so that a
    knob's settings share one bundle, one runtime copy and one device call."""
    out: dict[str, dict[str, str]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        label, sep, settings = part.partition(":")
        if not sep or not label.isidentifier():
            raise SystemExit(f"--variants: {part!r} is not label:VAR=VALUE,... (a label of "
                             "letters, digits and underscores)")
        pairs = {}
        for item in filter(None, settings.split(",")):
            var, eq, value = item.partition("=")
            if not eq or not var.startswith("TVM_SMARTMEM_"):
                raise SystemExit(f"--variants: {item!r} in {label!r} is not "
                                 "TVM_SMARTMEM_NAME=VALUE")
            pairs[var] = value
        if label in out:
            raise SystemExit(f"--variants: label {label!r} given twice")
        out[label] = pairs
    return out


def _static_resources(ex, facts: dict) -> dict[str, dict]:
    """Per kernel (by the name a profile gives it) registers, shared memory, spills and
    resident warps on the H100 (``kernel_resources.py``); {} without nvcc here."""
    import kernel_resources as kr

    if shutil.which("nvcc") is None:
        return {}
    mp = kr.DEVICES["h100"]
    found = kr.ptxas_resources(kr.cuda_source(ex), mp.arch)
    out = {}
    for name, (threads, blocks) in facts.get("launch", {}).items():
        res = found.get(f"{name}_kernel")
        if res is None:
            continue
        per_sm = kr.occupancy(mp, threads, res["registers"], res["shared"])
        out[name] = {**res, "threads": threads, "blocks": blocks,
                     "resident_warps": round(kr.resident_warps(mp, threads, blocks, per_sm), 1)}
    return out


def prepare(args: argparse.Namespace) -> None:
    import onnx
    import tvm

    from tvm_smartmem import frontend, switches, targets, zoo
    from tvm_smartmem.bench import git_commit
    from tvm_smartmem.report import compile_with_facts

    bundle = Path(args.bundle)
    if bundle.exists():
        shutil.rmtree(bundle)
    (bundle / "models").mkdir(parents=True)
    names = zoo.resolve(args.models)
    pipelines = args.pipelines.split(",")
    target_names = args.targets.split(",")
    variants = parse_variants(getattr(args, "variants", ""))
    manifest = {"created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "git_commit": git_commit(), "host": platform.node(),
                "tvm": tvm.__version__, "seed": SEED, "pipelines": pipelines,
                "variants": variants, "models": {}}
    # (build name, pipeline, pipeline switches): the plain builds, then each variant
    plan = [(pipeline, pipeline, {}) for pipeline in pipelines]
    plan += [(f"smartmem_{label}", "smartmem", settings)
             for label, settings in variants.items()]
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        path = zoo.model_path(name)
        model = onnx.load(str(path))
        mod, params = frontend.from_onnx(model)
        weight_set = frontend.weight_names(model.graph)
        weights = [init.name for init in model.graph.initializer if init.name in weight_set]
        out = bundle / "models" / name
        out.mkdir()
        entry = {"inputs": frontend.input_signature(mod), "weights": _weight_spec(params),
                 "weight_names": weights, "builds": {}}
        onnx.save(_graph_with_weight_inputs(model, weights), str(out / "graph.onnx"))
        for build, pipeline, settings in plan:
            for target_name in target_names:
                if target_name == "opencl-texture" and pipeline == "baseline":
                    continue  # the generic GPU pipeline: the same build as baseline-opencl
                tgt = targets.get(target_name)
                with switches.applied(settings):
                    ex, stats, secs, facts = compile_with_facts(mod, tgt, pipeline)
                resources = _static_resources(ex, facts) if target_name == "cuda" else {}
                lib = out / f"{build}-{target_name}.so"
                ex.export_library(str(lib))
                entry["builds"][f"{build}-{target_name}"] = {
                    "library": lib.name, "target": str(tgt), "compile_seconds": round(secs, 1),
                    "switches": settings,
                    "device": "cuda" if target_name == "cuda" else "opencl",
                    "stats": stats.summary(),
                    # the kind of each kernel, by the name a profile gives it: measured
                    # texture profiles become per-kind ratios (texture_activations.py ratios)
                    "kernel_kinds": facts.get("kernel_kinds", {}),
                    # registers, shared memory and resident warps per kernel (CUDA, when this
                    # machine has nvcc): the profile tables show them beside the times
                    "resources": resources,
                }
        manifest["models"][name] = entry
        print(f"[{i}/{len(names)}] {name}: {len(params)} weights, "
              f"{len(entry['builds'])} builds in {time.perf_counter() - t0:.0f} s",
              flush=True)
    finish_bundle(bundle, manifest)


def finish_bundle(bundle: Path, manifest: dict) -> None:
    """Pack what ``bundle/models`` holds with the runtime, the ICD file and the manifest."""
    _pack_runtime(bundle)
    # libraries are mostly kernel source text: compressed, a dozen models fit in one call
    with tarfile.open(bundle / "models.tar.gz", "w:gz") as tar:
        tar.add(bundle / "models", arcname="models")
    shutil.rmtree(bundle / "models")
    (bundle / "icd").mkdir()
    (bundle / "icd" / "nvidia.icd").write_text("libnvidia-opencl.so.1\n")
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    print(f"bundle {bundle}: {size / 2**20:.1f} MiB (the device tool carries at most 64 MiB)")
    if size > 60 * 2**20:
        raise SystemExit("bundle too large for one device call: prepare fewer models")


def _pack_runtime(bundle: Path) -> None:
    """The runtime-only TVM package and the cp312 tvm-ffi wheel for the GPU machine."""
    import tvm

    tvm_dir = Path(tvm.__file__).resolve().parent

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        skip = ("lib/libtvm_compiler.so", "/3rdparty", "__pycache__")
        return None if any(s in info.name for s in skip) else info

    with tarfile.open(bundle / "tvm_runtime.tar.gz", "w:gz") as tar:
        tar.add(tvm_dir, arcname="tvm", filter=keep)
    wheels = bundle / "wheels"
    wheels.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.12", "--implementation", "cp",
         "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64",
         "-d", str(wheels), f"apache-tvm-ffi=={FFI_VERSION}"],
        check=True,
    )


# =============================================================================================
# measure (GPU machine, runtime-only TVM)
# =============================================================================================


def _setup_runtime(bundle: Path, site: Path) -> dict[str, str]:
    """Unpack the runtime-only TVM and tvm-ffi into ``site``; return the environment to use."""
    if not (site / "tvm").exists():
        site.mkdir(parents=True, exist_ok=True)
        wheels = sorted(str(w) for w in (bundle / "wheels").glob("*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                        "--no-deps", "--no-compile", "--target", str(site), *wheels], check=True)
        with tarfile.open(bundle / "tvm_runtime.tar.gz") as tar:
            tar.extractall(site, filter="data")
    # the models unpacked in ``site`` must be this bundle's: a site reused for another bundle
    # would run the other bundle's libraries under this bundle's names (it did, once)
    stamp = site / "models" / ".bundle"
    ident = f"{bundle.resolve()} {(bundle / 'manifest.json').stat().st_mtime_ns}"
    if not stamp.exists() or stamp.read_text() != ident:
        shutil.rmtree(site / "models", ignore_errors=True)
        with tarfile.open(bundle / "models.tar.gz") as tar:
            tar.extractall(site, filter="data")
        stamp.write_text(ident)
    env = dict(os.environ)
    env["SMARTMEM_BUNDLE_MODELS"] = str(site / "models")
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    env["OCL_ICD_VENDORS"] = str((bundle / "icd").resolve())
    env["TVM_SMARTMEM_OPENCL_LIB"] = "libOpenCL.so.1"
    env.setdefault("TVM_SMARTMEM_CACHE", "/tmp/tvm_smartmem_cache")
    env["TVM_USE_RUNTIME_LIB"] = "1"
    return env


def _regenerate(spec: list[dict], seed: int):
    import base64

    import numpy as np

    out = []
    for i, w in enumerate(spec):
        rng = np.random.default_rng(seed + i)
        if "exact" in w:
            raw = base64.b64decode(w["exact"])
            out.append(np.frombuffer(raw, dtype=w["dtype"]).reshape(w["shape"]).copy())
            continue
        if w["std"] == 0.0:
            a = np.full(w["shape"], w["mean"])
        else:
            a = w["mean"] + w["std"] * rng.standard_normal(w["shape"])
        if w["nonnegative"]:
            a = np.abs(a)
        out.append(a.astype(w["dtype"]))
    return out


def _inputs(signature: list[dict], seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for s in signature:
        if s["dtype"].startswith("int"):
            out.append(rng.integers(0, 1000, size=s["shape"]).astype(s["dtype"]))
        else:
            out.append(rng.standard_normal(s["shape"]).astype(s["dtype"]))
    return out


def _register_cuda_compiler() -> None:
    """CUDA modules keep their source and are compiled when loaded.  TVM's own callback
    (tvm.support.nvcc) imports compiler-only modules, which the runtime-only package lacks, so
    this one calls nvcc directly (cubin for the device's architecture)."""
    import tempfile

    import tvm_ffi

    arch = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.split()[0].replace(".", "")

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_):
        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.cubin")
            Path(src).write_text(code)
            subprocess.run(["nvcc", "--cubin", f"-arch=sm_{arch}", "-O3", "-o", out, src],
                           check=True, capture_output=True)
            return bytearray(Path(out).read_bytes())


def _measure_stage2(args: argparse.Namespace) -> None:
    import numpy as np
    import onnxruntime as ort
    import tvm
    from tvm_ffi.libinfo import load_lib_ctypes

    from tvm_smartmem import numerics
    from tvm_smartmem.measure import LocalRunner, load_runnable
    from tvm_smartmem.runtime import opencl

    bundle = Path(args.bundle)
    models_dir = Path(os.environ["SMARTMEM_BUNDLE_MODELS"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    tvm_lib = Path(tvm.__file__).resolve().parent / "lib"
    load_lib_ctypes("tvm", "tvm_runtime_cuda", "RTLD_GLOBAL", extra_lib_paths=[tvm_lib])
    _register_cuda_compiler()
    opencl.load()
    info = opencl.describe()
    results = {
        "manifest": {k: v for k, v in manifest.items() if k != "models"},
        "machine": {"host": platform.node(), "python": platform.python_version(),
                    "tvm": tvm.__version__, "numpy": np.__version__,
                    "onnxruntime": ort.__version__,
                    "cuda_device": tvm.cuda(0).device_name if tvm.cuda(0).exist else None,
                    "opencl": {k: info.get(k) for k in ("platform", "devices", "loader")}},
        "protocol": {"repeat": args.repeat, "number": args.number, "warmup": args.warmup},
        "models": {},
    }
    print(f"cuda: {results['machine']['cuda_device']}; opencl: {info.get('platform')} "
          f"{[d['name'] for d in info.get('devices', [])]} {info.get('error', '')}", flush=True)
    names = [n for n in manifest["models"] if not args.only or n == args.only]
    if args.peers_only:
        names = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out / "gpu_results.json").write_text(json.dumps(results, indent=2))

    for i, name in enumerate(names, 1):
        entry = manifest["models"][name]
        params = _regenerate(entry["weights"], manifest["seed"])
        inputs = _inputs(entry["inputs"], manifest["seed"])
        feeds = {s["name"]: a for s, a in zip(entry["inputs"], inputs, strict=True)}
        feeds.update(zip(entry["weight_names"], params, strict=True))
        try:
            sess = ort.InferenceSession(str(models_dir / name / "graph.onnx"),
                                        providers=["CPUExecutionProvider"])
            ref = [np.asarray(o) for o in sess.run(None, feeds)]
        except Exception as exc:  # no reference, no check: record it and go on
            results["models"][name] = {"error": f"ONNX Runtime reference: {exc}"[:600],
                                       "builds": {}}
            print(f"[{i}/{len(names)}] {name}: ONNX Runtime reference failed: {exc}"[:300],
                  flush=True)
            save()
            continue
        model_out = {"builds": {}}
        for build, b in entry["builds"].items():
            if args.builds and build not in args.builds.split(","):
                continue
            device = b.get("device") or build.rsplit("-", 1)[1]
            row = {"stats": b["stats"], "compile_seconds": b["compile_seconds"],
                   "kernel_kinds": b.get("kernel_kinds", {}),
                   "resources": b.get("resources", {})}
            try:
                runner = LocalRunner(device, repeat=args.repeat, number=args.number,
                                     warmup=args.warmup)
                module = load_runnable(models_dir / name / b["library"])
                # twenty calls on one VM, all the same bits: no race between thread blocks
                outs, repeatable = runner.repeated_outputs(module, inputs, params,
                                                           calls=args.calls)
                ok, err = numerics.compare(outs, ref)
                row["repeatable"] = repeatable
                if args.races and (not repeatable or args.races < 0):  # where it diverges
                    row["divergence"] = runner.first_divergence(module, inputs, params,
                                                                runs=abs(args.races))
                profile = name in args.profile.split(",")
                timing = runner.run(module, inputs, params, profile=profile)
                if profile:  # per kernel, synchronised around each call: for ranking only
                    row["profile_us"] = sorted(
                        ({"kernel": k.name, "calls": k.calls, "total_us": k.total_us}
                         for k in timing.profile), key=lambda r: -r["total_us"])
                row.update(matches_onnxruntime=ok, max_error=err, **{
                    k: getattr(timing, k) for k in ("median_ms", "min_ms", "max_ms", "mean_ms",
                                                    "std_ms", "samples_ms", "device_name")})
            except Exception as exc:  # record and go on: one failing build must not lose the rest
                import traceback

                tail = "".join(traceback.format_exception(exc)[-4:])
                row["error"] = f"{type(exc).__name__}: {str(exc)[:600]} | {tail[-800:]}"
            model_out["builds"][build] = row
            results["models"][name] = model_out
            save()  # after every build: a process stopped at the deadline keeps what it has
            print(f"[{i}/{len(names)}] {name} {build}: "
                  + (f"{row['median_ms']:.3f} ms, max error {row['max_error']:.1e}"
                     if "median_ms" in row else row.get("error", "")), flush=True)
        results["models"][name] = model_out
        save()
    if args.peers_only:
        results["peers"] = {}
        _torch_peers(list(manifest["models"]), args, results["peers"], save)
    save()
    print(f"wrote {out / 'gpu_results.json'}")


def _torch_peers(names: list[str], args: argparse.Namespace, out: dict,
                 save: Callable[[], None]) -> dict:
    """PyTorch eager and torch.compile(mode="reduce-overhead") on the same architectures,
    filled into ``out`` model by model (``save`` after each)."""
    import torch

    from tvm_smartmem import zoo

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out["torch"] = torch.__version__

    def time_cuda(fn, inputs) -> list[float]:
        for _ in range(10):
            fn(*inputs)
        torch.cuda.synchronize()
        samples = []
        for _ in range(args.repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.number):
                fn(*inputs)
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / args.number)
        return samples

    for name in names:
        row = {}
        try:
            torch.manual_seed(0)
            module, example, _ = zoo.MODELS[name].build()
            module = module.eval().cuda()
            inputs = [a.cuda() for a in example]
            with torch.no_grad():
                eager = time_cuda(module, inputs)
                row["eager_median_ms"] = sorted(eager)[len(eager) // 2]
                t0 = time.perf_counter()
                compiled = torch.compile(module, mode="reduce-overhead")
                compiled(*inputs)
                row["compile_seconds"] = round(time.perf_counter() - t0, 1)
                graphs = time_cuda(compiled, inputs)
                row["compile_median_ms"] = sorted(graphs)[len(graphs) // 2]
        except Exception as exc:  # a peer failing is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        out[name] = row
        save()
        print(f"torch {name}: {row}", flush=True)
    return out


def relaunch_stage2(script: str, args: argparse.Namespace, extra: list[str] = ()) -> None:
    """Run ``script measure --stage2`` under the bundle's runtime-only TVM (the sweeps'
    measure step): same bundle, output and timing protocol, plus ``extra`` arguments."""
    bundle = Path(args.bundle).resolve()
    env = _setup_runtime(bundle, Path(args.site))
    cmd = [sys.executable, script, "measure", "--stage2", "--bundle", str(bundle),
           "--out", args.out, "--repeat", str(args.repeat), "--number", str(args.number),
           *extra]
    raise SystemExit(subprocess.run(cmd, env=env).returncode)


def measure(args: argparse.Namespace) -> None:
    """Each model in a process of its own (a kernel that breaks the OpenCL context -- a failed
    build, an out-of-bounds write -- then costs that model's remaining builds, not the run's),
    the PyTorch peers in one more; the parts are merged into ``gpu_results.json`` after each."""
    if args.stage2:
        _measure_stage2(args)
        return
    import tempfile

    bundle = Path(args.bundle).resolve()
    env = _setup_runtime(bundle, Path(args.site))
    names = [n for n in json.loads((bundle / "manifest.json").read_text())["models"]
             if not args.models or n in args.models.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = Path(tempfile.mkdtemp(prefix="gpu_parts_"))  # $OUT takes few files, few levels
    merged: dict = {}
    deadline = time.monotonic() + args.deadline if args.deadline else None
    jobs = [["--only", n] for n in names] + ([["--peers-only"]] if args.peers else [])
    for job in jobs:
        part = parts / job[-1]
        cmd = [sys.executable, __file__, "measure", "--stage2", "--bundle", str(bundle),
               "--out", str(part), "--repeat", str(args.repeat), "--number", str(args.number),
               "--warmup", str(args.warmup), "--profile", args.profile,
               "--builds", args.builds, "--races", str(args.races),
               "--calls", str(args.calls), *job]
        left = deadline - time.monotonic() if deadline else None
        if left is not None and left < 15:  # no time for a model: say so rather than be cut
            merged.setdefault("models", {})[job[-1]] = {
                "error": "not measured: the run's --deadline was reached", "builds": {}}
            (out / "gpu_results.json").write_text(json.dumps(merged, indent=2))
            continue
        try:
            rc = subprocess.run(cmd, env=env, timeout=left).returncode
        except subprocess.TimeoutExpired:  # its builds measured so far are in its part file
            rc = "killed at the run's --deadline"
        got = part / "gpu_results.json"
        if not got.exists():
            merged.setdefault("models", {})[job[-1]] = {
                "error": f"measuring process exited with {rc} before writing results",
                "builds": {}}
        else:
            data = json.loads(got.read_text())
            for key, value in data.items():
                if key in ("models", "peers"):
                    merged.setdefault(key, {}).update(value)
                else:
                    merged.setdefault(key, value)
        (out / "gpu_results.json").write_text(json.dumps(merged, indent=2))
    print(f"wrote {out / 'gpu_results.json'}")


# =============================================================================================
# report (CPU machine)
# =============================================================================================


def report(args: argparse.Namespace) -> None:
    data = json.loads(Path(args.results).read_text())
    if args.peers_from:
        other = json.loads(Path(args.peers_from).read_text())
        data["peers"] = other.get("peers", {})
        data["peers_note"] = (f"PyTorch columns: measured in an earlier call on the same machine "
                              f"kind ({other['machine'].get('cuda_device')}), commit "
                              f"`{other['manifest']['git_commit']}`.")
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name
    data["command"] = args.command
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=2))
    builds = sorted({b for m in data["models"].values() for b in m["builds"]})
    peers = data.get("peers", {})
    pairs = _speedup_pairs(builds)
    header = ["model"] + [f"{b} (ms)" for b in builds] + \
        [f"speedup {dev}" for dev in pairs] + ["kernels"]
    if peers:
        header += ["PyTorch eager (ms)", "torch.compile (ms)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in data["models"].items():
        cells = [name]
        for b in builds:
            row = m["builds"].get(b, {})
            if "median_ms" in row:
                mark = "" if row.get("matches_onnxruntime") else " (MISMATCH)"
                if row.get("repeatable") is False:  # calls disagreed: a race somewhere
                    mark += " (UNSTABLE)"
                cells.append(f"{row['median_ms']:.3f}{mark}")
            else:  # an error recorded, or a build the call never reached (its --deadline)
                cells.append("error" if row.get("error") or (m.get("error") and
                             "deadline" not in m["error"]) else "not measured")
        for base, ours in pairs.values():
            ratio = _speedup(m, base, ours)
            cells.append(f"{ratio:.2f}x" if ratio else "n/a")
        kernels = {b: m["builds"][b]["stats"]["kernels"] for b in m["builds"]}
        cells.append(", ".join(f"{k}={v}" for k, v in sorted(kernels.items())))
        if peers:
            p = peers.get(name, {})
            cells += [f"{p['eager_median_ms']:.3f}" if "eager_median_ms" in p else "n/a",
                      f"{p['compile_median_ms']:.3f}" if "compile_median_ms" in p else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    if pairs:
        cells = ["**geomean**"] + [""] * len(builds)
        for base, ours in pairs.values():
            ratios = [r for m in data["models"].values() if (r := _speedup(m, base, ours))]
            cells.append(f"**{_geomean(ratios):.2f}x**" if ratios else "n/a")
        cells += [""] * (len(header) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    lines += _profile_tables(data)
    machine = data["machine"]
    proto = data["protocol"]
    md = [f"# {args.title}", "",
          f"Device: {machine.get('cuda_device')} (CUDA) and "
          f"{', '.join(d['name'] for d in machine['opencl'].get('devices') or [])} "
          f"({machine['opencl'].get('platform')}). fp32, batch 1, random weights.",
          f"Protocol: {proto['warmup']} warm-up calls, median of {proto['repeat']} x "
          f"{proto['number']} calls (`time_evaluator`). Outputs checked against ONNX Runtime.",
          f"Compiled at commit `{data['manifest']['git_commit']}` with TVM "
          f"{data['manifest']['tvm']}; measured with runtime-only TVM {machine['tvm']}.",
          *([data["peers_note"]] if data.get("peers_note") else []), "",
          *lines, "",
          f"Reproduce: `{args.command}`", f"Raw data: `benchmarks/results/{stem}.json`", ""]
    (out_dir / f"{stem}.md").write_text("\n".join(md))
    _plot(data, builds, peers, out_dir / f"{stem}.png", args.title)
    print("\n".join(md))


def _speedup_pairs(builds: list[str]) -> dict[str, tuple[str, str]]:
    """label -> (reference build, our build): baseline vs smartmem per device that has both,
    every other variant (``smartmem_<label>-<device>``, see ``merge``) vs the same device's
    baseline, and for texture builds, textures over our own buffer build and over TVM's
    OpenCL."""
    pairs = {b.split("-", 1)[1]: (b, "smartmem-" + b.split("-", 1)[1]) for b in builds
             if b.startswith("baseline-") and "smartmem-" + b.split("-", 1)[1] in builds}
    for b in builds:
        variant, _, device = b.partition("-")
        if variant.startswith("smartmem_") and f"baseline-{device}" in builds:
            pairs[f"{variant.removeprefix('smartmem_')} {device}"] = (f"baseline-{device}", b)
        if variant.startswith("smartmem_") and f"smartmem-{device}" in builds:
            pairs[f"{variant.removeprefix('smartmem_')} over smartmem {device}"] = (
                f"smartmem-{device}", b)
    if "smartmem-opencl-texture" in builds:
        if "smartmem-opencl" in builds:
            pairs["texture over buffers"] = ("smartmem-opencl", "smartmem-opencl-texture")
        if "baseline-opencl" in builds:
            pairs["texture over TVM opencl"] = ("baseline-opencl", "smartmem-opencl-texture")
    return pairs


def merge(args: argparse.Namespace) -> None:
    """Results of several bundles measured in one device call, as one file: ``path:label``
    renames that file's ``smartmem-<device>`` builds to ``smartmem_<label>-<device>`` (an
    earlier commit, an experiment), so that each variant is a column of its own and is
    compared with the same call's baseline by ``report``."""
    merged: dict = {}
    for spec in args.results:
        path, _, label = spec.partition(":")
        try:
            data = json.loads(Path(path).read_text())
            if "models" not in data or "manifest" not in data:
                raise KeyError("models / manifest")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"merge: {path} is not a gpu_results.json of `measure` "
                             f"({type(exc).__name__}: {exc})") from None
        for key in ("manifest", "machine", "protocol"):
            merged.setdefault(key, data[key])
        if label:
            merged.setdefault("variants", {})[label] = data["manifest"].get("git_commit")
        for name, model in data["models"].items():
            into = merged.setdefault("models", {}).setdefault(name, {"builds": {}})
            for build, row in model.get("builds", {}).items():
                pipeline, _, device = build.partition("-")
                key = f"{pipeline}_{label}-{device}" if label and pipeline == "smartmem" \
                    else build
                into["builds"][key] = row
    Path(args.out).write_text(json.dumps(merged, indent=2))
    print(f"wrote {args.out}: {len(merged.get('models', {}))} models")


def _speedup(model: dict, base: str, ours: str) -> float | None:
    """Baseline latency over smartmem latency, only when both ran and both are correct."""
    a, b = model["builds"].get(base, {}), model["builds"].get(ours, {})
    if not (a.get("matches_onnxruntime") and b.get("matches_onnxruntime")):
        return None
    if a.get("repeatable") is False or b.get("repeatable") is False:
        return None
    return a["median_ms"] / b["median_ms"]


def _geomean(values: list[float]) -> float:
    import math

    return math.exp(sum(math.log(v) for v in values) / len(values))


def _profile_tables(data: dict, top: int = 8) -> list[str]:
    """The slowest kernels of each profiled build (``measure --profile``)."""
    lines: list[str] = []
    for name, m in data["models"].items():
        for build, row in m["builds"].items():
            if "profile_us" not in row:
                continue
            total = sum(k["total_us"] for k in row["profile_us"])
            res = row.get("resources") or {}
            lines += ["", f"Slowest kernels, {name} {build} (synchronised per call, "
                      f"{total:.0f} us in all" + ("; registers and resident warps per "
                                                  "multiprocessor from ptxas" if res else "") +
                      "):", ""]
            if res:
                lines += ["| kernel | calls | us | regs | blocks | resident warps |",
                          "|---|---|---|---|---|---|"]
                lines += [f"| `{k['kernel'][:70]}` | {k['calls']} | {k['total_us']:.1f} | "
                          + (f"{r['registers']} | {r['blocks']} | {r['resident_warps']} |"
                             if (r := res.get(k["kernel"])) else "| | |")
                          for k in row["profile_us"][:top]]
            else:
                lines += ["| kernel | calls | us |", "|---|---|---|"]
                lines += [f"| `{k['kernel'][:70]}` | {k['calls']} | {k['total_us']:.1f} |"
                          for k in row["profile_us"][:top]]
    return lines


def _plot(data: dict, builds: list[str], peers: dict, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    names = list(data["models"])
    series = {b: [data["models"][n]["builds"].get(b, {}).get("median_ms", 0) for n in names]
              for b in builds}
    if peers:
        series["PyTorch eager"] = [peers.get(n, {}).get("eager_median_ms", 0) for n in names]
        series["torch.compile"] = [peers.get(n, {}).get("compile_median_ms", 0) for n in names]
    pairs = _speedup_pairs(builds)
    rows = 2 if pairs else 1
    fig, axes = plt.subplots(rows, 1, figsize=(1.8 + 1.6 * len(names), 4 * rows), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(names))], values, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    ax.set_ylabel("latency (ms, median)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    if pairs:
        sx = axes[1][0]
        w = 0.8 / len(pairs)
        for k, (dev, (base, ours)) in enumerate(pairs.items()):
            ratios = [_speedup(data["models"][n], base, ours) or 0 for n in names]
            sx.bar([i + k * w for i in range(len(names))], ratios, w, label=f"{dev}")
        sx.axhline(1.0, color="black", linewidth=0.8)
        sx.set_xticks([i + 0.4 - w / 2 for i in range(len(names))], names)
        sx.set_ylabel("speedup over TVM default (x)")
        sx.set_title("smartmem vs TVM default pipeline, same device (0 = mismatch or error)")
        sx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare", help="compile and bundle (CPU machine)")
    a.add_argument("--models", default="resnet50,deit_small,bert_base")
    a.add_argument("--pipelines", default="baseline", help="baseline,smartmem")
    a.add_argument("--targets", default=",".join(TARGETS),
                   help="cuda,opencl[,opencl-texture] (the texture target runs on NVIDIA's "
                        "OpenCL; TVM's baseline has no texture path, so it is not built there)")
    a.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    a.add_argument("--variants", default="",
                   help="extra smartmem builds with pipeline switches, "
                        "label:TVM_SMARTMEM_X=v,TVM_SMARTMEM_Y=w;label2:... -> builds "
                        "smartmem_<label>-<target>, compared with smartmem-<target> by report")
    a.set_defaults(func=prepare)
    m = sub.add_parser("measure", help="run on the GPU machine")
    m.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    m.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    m.add_argument("--site", default="/tmp/tvm_smartmem_site")
    m.add_argument("--repeat", type=int, default=5)
    m.add_argument("--number", type=int, default=50)
    m.add_argument("--warmup", type=int, default=10)
    m.add_argument("--peers", action="store_true", help="also PyTorch eager / torch.compile")
    m.add_argument("--profile", default="", help="models to time kernel by kernel too")
    m.add_argument("--models", default="", help="only these models of the bundle (a,b,...)")
    m.add_argument("--deadline", type=float, default=0,
                   help="seconds: stop starting models after this, and stop the one running "
                        "(what it measured is kept) -- set it inside the device call's limit")
    m.add_argument("--builds", default="",
                   help="only these builds (a,b,...: pipeline-target names, e.g. "
                        "smartmem-opencl-texture)")
    m.add_argument("--races", type=int, default=0,
                   help="for a build whose repeated calls disagree, run it this many times "
                        "kernel by kernel and record the first kernel whose outputs differ "
                        "(negative: every build, repeatable or not)")
    m.add_argument("--calls", type=int, default=20,
                   help="calls of each build on one VM that must give the same bits")
    m.add_argument("--stage2", action="store_true", help=argparse.SUPPRESS)
    m.add_argument("--only", default="", help=argparse.SUPPRESS)  # stage 2: one model
    m.add_argument("--peers-only", action="store_true", help=argparse.SUPPRESS)
    m.set_defaults(func=measure)
    g = sub.add_parser("merge", help="several results files of one call as one (CPU machine)")
    g.add_argument("results", nargs="+", help="gpu_results.json[:label] (label: rename that "
                   "file's smartmem builds to smartmem_<label>)")
    g.add_argument("--out", required=True)
    g.set_defaults(func=merge)
    r = sub.add_parser("report", help="tables and plot from gpu_results.json (CPU machine)")
    r.add_argument("--results", required=True)
    r.add_argument("--name", default="gpu_baseline")
    r.add_argument("--title", default="TVM default pipeline on the H100: CUDA vs NVIDIA OpenCL")
    r.add_argument("--command", default="see CONTRIBUTING.md, 'Measuring on the GPU machine'")
    r.add_argument("--peers-from", help="take the PyTorch peers from another results file "
                   "(same machine kind; the peers do not depend on our code)")
    r.set_defaults(func=report)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
