"""Static resources of a model's CUDA kernels: registers, spills, shared memory, occupancy.

Some schedule choices can only be settled on the GPU (how fast), but what they cost in
resources is known at compile time, on any machine with the CUDA toolkit: ``ptxas`` says how
many registers and bytes of shared memory each kernel takes and whether it spills; with the
launch configuration of the TIR (threads per block, blocks) that gives how many warps each
kernel can keep resident per multiprocessor -- the latency hiding a kernel without register
tiling lives on.  This compiles the smartmem CUDA build of each model (the pipeline switches
in the environment apply, so a knob's two settings are two runs), runs ``nvcc -cubin
--resource-usage`` for ``--arch``, and writes per kernel: launches per inference, threads,
blocks, registers, spills, shared memory, the occupancy limit (warps per multiprocessor) and
the warps the grid actually puts on each multiprocessor.  No GPU is needed; no timing is made.

    python benchmarks/kernel_resources.py --models deit_small,bert_base --name res_default
    TVM_SMARTMEM_ATTENTION_KEYS=256 TVM_SMARTMEM_ATTENTION_LANES=64 \\
        python benchmarks/kernel_resources.py --models deit_small --name res_lanes64

Writes ``benchmarks/results/<name>.{json,md,png}``.  The occupancy arithmetic is NVIDIA's
(CUDA occupancy calculator) with the per-multiprocessor limits of ``DEVICES``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Multiprocessor:
    """Per-multiprocessor limits of one GPU generation (NVIDIA's occupancy calculator)."""

    arch: str
    sms: int
    max_warps: int = 64
    max_blocks: int = 32
    registers: int = 65536
    register_unit: int = 256  # registers are allocated to a warp in units of this many
    shared: int = 233472  # bytes usable by resident blocks together
    shared_reserved: int = 1024  # bytes the system takes per block
    shared_unit: int = 128


#: the GPUs of the device tool (H100 SXM: 132 multiprocessors; H200: the same chip)
DEVICES = {"h100": Multiprocessor("sm_90", 132), "h200": Multiprocessor("sm_90", 132)}

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(text: str) -> dict[str, dict]:
    """Registers, shared memory and spill bytes per entry function from ptxas's ``-v`` log."""
    out: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = out.setdefault(m.group(1), {"registers": 0, "shared": 0, "spills": 0})
        elif current is not None and (m := _SPILL.search(line)):
            current["spills"] = int(m.group(1)) + int(m.group(2))
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m.group(1))
            current["shared"] = int(m.group(2) or 0)
    return out


def occupancy(mp: Multiprocessor, threads: int, registers: int, shared: int) -> int:
    """Thread blocks one multiprocessor holds at once (the smallest of the warp, block,
    register and shared-memory limits)."""
    warps = max(1, math.ceil(threads / 32))
    per_warp = math.ceil(max(registers, 1) * 32 / mp.register_unit) * mp.register_unit
    by_registers = (mp.registers // per_warp) // warps
    block_shared = math.ceil((shared + mp.shared_reserved) / mp.shared_unit) * mp.shared_unit
    by_shared = mp.shared // block_shared if shared else mp.max_blocks
    return max(0, min(mp.max_blocks, mp.max_warps // warps, by_registers, by_shared))


def resident_warps(mp: Multiprocessor, threads: int, blocks: int, per_sm: int) -> float:
    """Warps per multiprocessor while the first wave runs: the grid spread over the
    multiprocessors, at most ``per_sm`` blocks on each."""
    warps = max(1, math.ceil(threads / 32))
    return min(blocks, per_sm * mp.sms) * warps / mp.sms


def launch_configs(func) -> list[tuple[int, int] | None]:
    """(threads per block, blocks) of each kernel of a scheduled PrimFunc, in launch order
    (``None``: a symbolic extent)."""
    from tvm_smartmem.analysis.thread_extents import kernel_launch_sizes

    return kernel_launch_sizes(func)


def cuda_source(executable) -> str:
    """The CUDA module's source of a ``tvm.compile`` result (not the host's LLVM IR)."""
    from tvm_smartmem.analysis.shared_memory import device_sources

    return device_sources(executable, kind="cuda")


def ptxas_resources(source: str, arch: str) -> dict[str, dict]:
    """Run ``nvcc -cubin --resource-usage`` on ``source``; per kernel resources."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("kernel_resources.py needs the CUDA toolkit's nvcc on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.cu"
        path.write_text(source)
        done = subprocess.run([nvcc, f"-arch={arch}", "-cubin", "--resource-usage", "-o",
                               str(Path(tmp) / "kernels.cubin"), str(path)],
                              capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"nvcc failed:\n{done.stderr[-2000:]}")
    return parse_ptxas(done.stdout + done.stderr)


def measure_model(name: str, mp: Multiprocessor) -> list[dict]:
    """One row per CUDA kernel of the model's smartmem build."""
    import tvm

    from tvm_smartmem import frontend, targets, zoo
    from tvm_smartmem.analysis.stats import collect
    from tvm_smartmem.pipeline import smartmem_pipeline

    target = targets.get("cuda")
    mod, _ = frontend.from_onnx(zoo.model_path(name))
    with target:
        lowered = smartmem_pipeline(target)(mod)
    launches = {k.name: k.launches for k in collect(lowered).kernel_table}
    funcs = {gv.name_hint: f for gv, f in lowered.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc)}
    resources = ptxas_resources(cuda_source(tvm.compile(lowered, target, relax_pipeline=None)),
                                mp.arch)
    rows = []
    for fname, func in funcs.items():
        rule = str(func.attrs["smartmem.schedule_rule"]) if func.attrs is not None and \
            "smartmem.schedule_rule" in func.attrs else ""
        for k, size in enumerate(launch_configs(func)):
            kernel = f"{fname}_kernel" if k == 0 else f"{fname}_kernel_{k}"
            res = resources.get(kernel)
            if res is None or size is None:
                continue
            threads, blocks = size
            per_sm = occupancy(mp, threads, res["registers"], res["shared"])
            rows.append({"kernel": kernel, "rule": rule, "launches": launches.get(fname, 0),
                         "threads": threads, "blocks": blocks, **res,
                         "blocks_per_sm": per_sm, "limit_warps": per_sm * math.ceil(threads / 32),
                         "resident_warps": round(resident_warps(mp, threads, blocks, per_sm), 2)})
    return rows


def summary(rows: list[dict]) -> dict:
    """Launch-weighted mean resident warps per multiprocessor, the kernels that spill, the
    most registers."""
    weight = sum(r["launches"] for r in rows) or 1
    return {"kernels": len(rows), "launches": sum(r["launches"] for r in rows),
            "mean_resident_warps": round(sum(r["resident_warps"] * r["launches"]
                                             for r in rows) / weight, 2),
            "spilling": [r["kernel"] for r in rows if r["spills"]],
            "max_registers": max((r["registers"] for r in rows), default=0)}


def _knobs() -> str:
    """The pipeline switches set in the environment (they change what is compiled), as a
    shell prefix ("" when none)."""
    from tvm_smartmem.bench import env_prefix

    return env_prefix()


def write(data: dict, name: str) -> Path:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"# CUDA kernel resources ({data['device']}, {data['arch']}): registers, shared "
             "memory, occupancy", "",
             f"Commit `{data['git_commit']}`, TVM {data['tvm']}, ptxas of `{data['nvcc']}`. "
             f"Pipeline switches: {data['knobs'] or 'none (defaults)'}.  Static: no kernel was "
             "run and nothing was timed.  *resident warps* = warps per multiprocessor while "
             "the grid's first wave runs (blocks spread over "
             f"{DEVICES[data['device']].sms} multiprocessors, at most the occupancy limit on "
             "each).", ""]
    for model, entry in data["models"].items():
        if "error" in entry:
            lines += [f"## {model}", "", f"error: {entry['error']}", ""]
            continue
        s = entry["summary"]
        lines += [f"## {model}", "",
                  f"{s['kernels']} kernels, {s['launches']} launches; launch-weighted resident "
                  f"warps per multiprocessor **{s['mean_resident_warps']}**; most registers "
                  f"{s['max_registers']}; spilling: {', '.join(s['spilling']) or 'none'}.", "",
                  "| kernel | rule | launches | threads | blocks | regs | smem (B) | spills (B) "
                  "| limit (warps/SM) | resident warps/SM |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(entry["kernels"], key=lambda r: -r["launches"] * r["blocks"]):
            lines.append(f"| `{r['kernel'][:70]}` | {r['rule']} | {r['launches']} | "
                         f"{r['threads']} | {r['blocks']} | {r['registers']} | {r['shared']} | "
                         f"{r['spills']} | {r['limit_warps']} | {r['resident_warps']} |")
        lines.append("")
    lines += [f"Reproduce: `{data['command']}`",
              f"Raw data: `benchmarks/results/{name}.json`"]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    _plot(data, out / f"{name}.png")
    return out / f"{name}.md"


def _plot(data: dict, path: Path) -> None:
    """Resident warps per multiprocessor of every kernel launch, one row of dots per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m, e in data["models"].items() if "kernels" in e]
    if not models:
        return
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(models) + 1.5))
    for y, model in enumerate(models):
        rows = data["models"][model]["kernels"]
        xs = [r["resident_warps"] for r in rows for _ in range(max(r["launches"], 1))]
        ax.scatter(xs, [y] * len(xs), alpha=0.3, s=14)
        ax.scatter([data["models"][model]["summary"]["mean_resident_warps"]], [y], marker="|",
                   s=300, color="black")
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("resident warps per multiprocessor (first wave; bar: launch-weighted mean)")
    ax.set_xlim(0, DEVICES[data["device"]].max_warps)
    ax.set_title(f"CUDA kernel occupancy, static ({data['knobs'] or 'defaults'})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    import tvm

    from tvm_smartmem import zoo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="deit_small,vit_base,bert_base,swin_tiny,gpt2")
    parser.add_argument("--device", default="h100", choices=sorted(DEVICES))
    parser.add_argument("--name", default="kernel_resources")
    args = parser.parse_args(argv)
    mp = DEVICES[args.device]
    names = zoo.resolve(args.models)
    data = {"device": args.device, "arch": mp.arch, "tvm": tvm.__version__,
            "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                         capture_output=True, check=False).stdout.strip(),
            "nvcc": subprocess.run(["nvcc", "--version"], text=True, capture_output=True,
                                   check=False).stdout.strip().splitlines()[-1:],
            "host": platform.node(), "knobs": _knobs().strip(),
            "command": _knobs() + "python benchmarks/kernel_resources.py " +
            " ".join(sys.argv[1:] if argv is None else argv),
            "models": {}}
    data["nvcc"] = data["nvcc"][0] if data["nvcc"] else "nvcc"
    for i, name in enumerate(names, 1):
        t0 = time.time()
        try:
            rows = measure_model(name, mp)
            data["models"][name] = {"summary": summary(rows), "kernels": rows}
            line = data["models"][name]["summary"]
        except Exception as exc:  # one model failing must not lose the others; it is reported
            data["models"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:800]}"}
            line = data["models"][name]["error"]
        print(f"[{i}/{len(names)}] {name}: {line} ({time.time() - t0:.0f} s)", flush=True)
    print(write(data, args.name))


if __name__ == "__main__":
    main()
