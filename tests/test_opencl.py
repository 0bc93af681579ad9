"""The OpenCL runtime on PoCL: kernels, whole models, textures, export, RPC, bad input.

PoCL (``pyopencl[pocl]``, part of the [test] extra) is a CPU OpenCL 3.0 device with image
support.  When it is installed and still no device shows up, these tests fail rather than skip.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import tvm
from conftest import assert_matches
from tvm import relax, te, topi

from tvm_smartmem import errors, frontend, models, numerics, targets
from tvm_smartmem.measure import LocalRunner, RPCRunner, prepare_weights
from tvm_smartmem.runtime import opencl

OPENCL = targets.get("opencl")


def _run_prim(mod: tvm.IRModule, arrays, dev, out_index=-1):
    ex = tvm.compile(mod, OPENCL)
    tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
    ex["main"](*tensors)
    return tensors[out_index].numpy()


def _schedule(func, *rules) -> tvm.IRModule:
    from tvm.s_tir import dlight as dl

    with OPENCL:
        return dl.ApplyDefaultSchedule(*rules)(tvm.IRModule({"main": func}))


# -- buffer kernels ------------------------------------------------------------------------


def test_device_is_visible_to_tvm(dev):
    assert dev.exist
    assert tvm.runtime.enabled("opencl")
    assert dev.max_threads_per_block > 0 and dev.max_shared_memory_per_block > 0


def test_elementwise_kernel(dev):
    from tvm.s_tir import dlight as dl

    a = te.placeholder((1000,), name="a")
    b = te.placeholder((1000,), name="b")
    c = te.compute(a.shape, lambda i: a[i] * 2.0 + b[i], name="c")
    mod = _schedule(te.create_prim_func([a, b, c]), dl.gpu.Fallback())
    x, y = np.random.rand(1000).astype("float32"), np.random.rand(1000).astype("float32")
    out = _run_prim(mod, [x, y, np.zeros(1000, "float32")], dev)
    assert_matches([out], [x * 2 + y])


def test_dlight_matmul_with_local_memory_and_barriers(dev):
    from tvm.s_tir import dlight as dl

    a = te.placeholder((128, 96), name="a")
    b = te.placeholder((96, 160), name="b")
    c = topi.matmul(a, b)
    mod = _schedule(te.create_prim_func([a, b, c]), dl.gpu.Matmul())
    source = tvm.compile(mod, OPENCL).mod.imports[0].inspect_source()
    assert "__local" in source and "barrier(CLK_LOCAL_MEM_FENCE)" in source
    x = np.random.rand(128, 96).astype("float32")
    y = np.random.rand(96, 160).astype("float32")
    out = _run_prim(mod, [x, y, np.zeros((128, 160), "float32")], dev)
    assert_matches([out], [x @ y])


def test_dynamic_shape_reduction(dev):
    from tvm.s_tir import dlight as dl

    n = tvm.tirx.Var("n", "int64")
    a = te.placeholder((n, 64), name="a")
    s = topi.sum(a, axis=1)
    mod = _schedule(te.create_prim_func([a, s]), dl.gpu.Reduction(), dl.gpu.Fallback())
    ex = tvm.compile(mod, OPENCL)
    for rows in (3, 17):
        x = np.random.rand(rows, 64).astype("float32")
        ta, ts = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(np.zeros(rows, "float32"), dev)
        ex["main"](ta, ts)
        assert_matches([ts.numpy()], [x.sum(axis=1)])


# -- whole models --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small_cnn", "bert_layer", "swin_block"])
def test_onnx_model_through_the_vm(dev, name):
    """swin_block: its shifted windows leave signed floor divisions in the folded indices, which
    TVM's GPU lowering got wrong once SimplifyIndices had moved the shift inside them (right on
    llvm, wrong on every OpenCL device); the GPU schedules must run here, not only on llvm."""
    model = models.get(name)
    mod, params = frontend.from_onnx(model)
    ex = tvm.compile(mod, OPENCL, relax_pipeline="smartmem")
    inputs = models.random_inputs(model, seed=5)
    vm = relax.VirtualMachine(ex, dev)
    weights = prepare_weights(vm, [tvm.runtime.tensor(a, dev) for a in params])
    out = vm["main"](*[tvm.runtime.tensor(a, dev) for a in inputs.values()], *weights)
    assert_matches([out.numpy()], numerics.onnxruntime_reference(model, inputs))


def test_exported_library_reloads_and_runs(dev, tmp_path):
    model = models.bert_layer()
    mod, params = frontend.from_onnx(model)
    path = tmp_path / "bert_opencl.so"
    tvm.compile(mod, OPENCL, relax_pipeline="smartmem").export_library(str(path))
    inputs = models.random_inputs(model, seed=6)
    outs = LocalRunner("opencl").outputs(tvm.runtime.load_module(str(path)),
                                         list(inputs.values()), params)
    assert_matches(outs, numerics.onnxruntime_reference(model, inputs))


# -- textures ------------------------------------------------------------------------------

SCOPES = {
    # scope: (shape, expected image (width, height, depth))
    "global.texture": ((2, 3, 5, 7, 4), (7, 5, 6)),
    "global.texture-weight": ((6, 2, 3, 3, 4), (18, 6, 1)),
    "global.texture-nhwc": ((2, 5, 3, 4, 4), (12, 5, 2)),
}


@pytest.mark.parametrize("scope", list(SCOPES))
@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "uint8"])
def test_image_round_trip_is_exact(dev, scope, dtype):
    shape, (w, h, d) = SCOPES[scope]
    x = (np.random.default_rng(0).random(shape) * 200 - (0 if dtype == "uint8" else 100))
    x = x.astype(dtype)
    img = tvm.runtime.empty(shape, dtype, dev, mem_scope=scope)
    img.copyfrom(x)
    assert opencl.image_info(img) == {"image": True, "width": w, "height": h, "depth": d}
    np.testing.assert_array_equal(img.numpy(), x)
    # device-side: image -> buffer -> image -> host
    buf = tvm.runtime.empty(shape, dtype, dev)
    buf.copyfrom(img)
    img2 = tvm.runtime.empty(shape, dtype, dev, mem_scope=scope)
    img2.copyfrom(buf)
    np.testing.assert_array_equal(img2.numpy(), x)
    assert opencl.image_info(buf)["image"] is False


def _texture_reader():
    """A kernel reading a global.texture input (lowered by TVM's Adreno TIR pipeline)."""
    import tvm.s_tir.backend.adreno.pipeline as adreno
    from tvm.script import tirx as T
    from tvm.tirx import compilation_pipeline as cp
    from tvm.tirx.build import split_host_device_mods, tir_to_runtime

    @T.prim_func
    def read_texture(a: T.Buffer((2, 4, 8, 4), "float32", scope="global.texture"),
                     b: T.Buffer((2, 4, 8, 4), "float32")):
        for bx in T.thread_binding(8, thread="blockIdx.x"):
            for tx in T.thread_binding(8, thread="threadIdx.x"):
                for c in T.vectorized(4):
                    b[bx // 4, bx % 4, tx, c] = a[bx // 4, bx % 4, tx, c] * T.float32(2)

    mod = tvm.tirx.transform.BindTarget(OPENCL)(tvm.IRModule({"main": read_texture}))
    mod = adreno.default_tir_pipeline()(mod)
    host, devices = split_host_device_mods(mod)
    _, host_pipeline, device_pipeline = cp.get_tir_pipeline("s_tir")
    return tir_to_runtime(host_pipeline()(host),
                          {t: device_pipeline()(d) for t, d in devices.items()},
                          tvm.target.Target("llvm"))


def test_texture_kernel_reads_images_and_rejects_buffers(dev):
    module = _texture_reader()
    assert "image2d_array_t" in module.imports[0].inspect_source()
    x = np.random.rand(2, 4, 8, 4).astype("float32")
    img = tvm.runtime.empty(x.shape, "float32", dev, mem_scope="global.texture")
    img.copyfrom(x)
    out = tvm.runtime.empty(x.shape, "float32", dev)
    module["main"](img, out)
    assert_matches([out.numpy()], [2 * x])
    # a plain buffer where the kernel expects an image: a clear error, not a crash in PoCL
    with pytest.raises(errors.OpenCLError, match="must be an image"):
        module["main"](tvm.runtime.tensor(x, dev), out)


# -- bad input -----------------------------------------------------------------------------


def test_image_larger_than_the_device_limit(dev):
    limit = opencl.describe()["devices"][0]["image2d_max"][0]
    with pytest.raises(errors.OpenCLError, match="exceeds the limits"):
        tvm.runtime.empty((1, limit + 1, 4), "float32", dev, mem_scope="global.texture")
    with pytest.raises(errors.OpenCLError, match="4 lanes"):
        tvm.runtime.empty((2, 3), "float32", dev, mem_scope="global.texture")
    with pytest.raises(errors.OpenCLError, match="unsupported memory scope"):
        tvm.runtime.empty((2, 4), "float32", dev, mem_scope="global.texture-nchw")


def _blob(name: str, code: str, tags=("blockIdx.x", "threadIdx.x")) -> bytes:
    """A serialized opencl module (the format TVM's OpenCL modules use)."""

    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    info = s(name) + struct.pack("<Q", 1) + bytes([3, 64]) + struct.pack("<H", 1)
    info += struct.pack("<Q", len(tags)) + b"".join(s(t) for t in tags)
    info += struct.pack("<Q", 1) + struct.pack("<i", 0)
    return s("cl") + struct.pack("<Q", 1) + s(name) + info + s(code)


def test_kernel_that_fails_to_build_reports_the_build_log(dev):
    load = tvm.get_global_func("ffi.Module.load_from_bytes.opencl")
    module = load(_blob("broken", "// Function: broken\n__kernel void broken(__global float* a)"
                                  " { a[0] = not_declared_anywhere; }\n"))
    out = tvm.runtime.empty((4,), "float32", dev)
    with pytest.raises(errors.OpenCLError, match="failed to build") as info:
        module["broken"](out, 1, 1)
    assert "not_declared_anywhere" in str(info.value)  # the build log is in the message


def test_corrupt_module_and_wrong_argument_count(dev):
    load = tvm.get_global_func("ffi.Module.load_from_bytes.opencl")
    with pytest.raises(errors.OpenCLError, match="corrupt OpenCL module"):
        load(_blob("k", "x")[:-3])
    module = load(_blob("ok", "// Function: ok\n__kernel void ok(__global float* a)"
                              " { a[get_global_id(0)] = 1.0f; }\n"))
    out = tvm.runtime.empty((4,), "float32", dev)
    module["ok"](out, 1, 4)
    np.testing.assert_array_equal(out.numpy(), np.ones(4, "float32"))
    with pytest.raises(errors.OpenCLError, match="takes 3 packed arguments"):
        module["ok"](out, 1)


def test_no_opencl_platform_is_a_clear_error():
    """In a fresh process that sees no platform: no device, and a clear error from the runner."""
    code = (
        "import tvm\n"
        "from tvm_smartmem.measure import LocalRunner\n"
        "print(tvm.opencl(0).exist)\n"
        "try:\n"
        "    LocalRunner('opencl')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__ + ': ' + str(e))\n"
    )
    env = {**os.environ, "TVM_SMARTMEM_OPENCL_PLATFORM": "no-such-vendor"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "False", proc.stderr
    assert lines[1].startswith("DeviceNotFoundError: device opencl:0 not found")
    assert "no-such-vendor" in lines[1]


def test_sync_mode_waits_after_every_launch_and_keeps_the_values(dev):
    """``TVM_SMARTMEM_OPENCL_SYNC=1`` (read once per process): every launch is followed by a
    wait, with the launch debug print naming each kernel; the values are those of the normal
    mode.  (A kernel that faults cannot be made on PoCL; on NVIDIA the wait names it.)"""
    code = (
        "import numpy as np, tvm\n"
        "from tvm import te\n"
        "from tvm.s_tir import dlight as dl\n"
        "from tvm_smartmem import targets\n"
        "x = te.placeholder((1000,), name='x')\n"
        "y = te.compute((1000,), lambda i: x[i] * 3.0 + 1.0, name='y')\n"
        "mod = tvm.IRModule({'main': te.create_prim_func([x, y])})\n"
        "tgt = targets.get('opencl')\n"
        "with tgt:\n"
        "    mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)\n"
        "f = tvm.compile(mod, tgt)\n"
        "dev = tvm.opencl(0)\n"
        "a = np.arange(1000, dtype='float32')\n"
        "out = tvm.runtime.empty((1000,), 'float32', dev)\n"
        "for _ in range(3):\n"
        "    f['main'](tvm.runtime.tensor(a, dev), out)\n"
        "print(float(np.abs(out.numpy() - (a * 3 + 1)).max()))\n"
    )
    env = {**os.environ, "TVM_SMARTMEM_OPENCL_SYNC": "1", "TVM_SMARTMEM_OPENCL_DEBUG": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "0.0"
    assert proc.stderr.count("[smartmem-opencl] module") == 3  # three launches, each reported


# -- runners -------------------------------------------------------------------------------


def test_local_runner_protocol_and_profile(dev):
    model = models.small_cnn()
    mod, params = frontend.from_onnx(model)
    ex = tvm.compile(mod, OPENCL, relax_pipeline="smartmem")
    result = LocalRunner("opencl", repeat=3, number=2, warmup=1).run(
        ex, list(models.random_inputs(model).values()), params, profile=True
    )
    assert result.repeat == 3 and len(result.samples_ms) == 3
    assert result.min_ms <= result.median_ms <= result.max_ms
    names = {k.name for k in result.profile}
    assert any(n.startswith("fused_conv2d") for n in names)
    assert all(k.calls >= 1 and k.total_us > 0 for k in result.profile)
    assert '"median_ms"' in result.to_json()


@pytest.fixture(scope="module")
def rpc_tracker(dev):
    """A tracker and one server (key 'loopback') on 127.0.0.1, as a phone would register.

    Both run in their own processes (TVM's Popen workers).  The server does not fork per
    session; uploads get unique names, so sessions do not collide."""
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tracker = Tracker("127.0.0.1", port=9190, port_end=9390, silent=True)
    server = rpc.Server(host="127.0.0.1", port=9400, port_end=9600, key="loopback",
                        tracker_addr=("127.0.0.1", tracker.port), silent=True, no_fork=True)
    try:
        deadline = time.time() + 120
        while "loopback" not in rpc.connect_tracker("127.0.0.1", tracker.port).summary().get(
            "queue_info", {}
        ):
            if time.time() > deadline:
                pytest.fail("the loopback RPC server did not register with the tracker")
            time.sleep(0.5)
        yield f"127.0.0.1:{tracker.port}"
    finally:
        server.terminate()
        tracker.terminate()


@pytest.mark.parametrize("device,target", [("cpu", "llvm"), ("opencl", "opencl")])
def test_rpc_runner_on_loopback(rpc_tracker, device, target):
    model = models.small_cnn()
    mod, params = frontend.from_onnx(model)
    ex = tvm.compile(mod, targets.get(target), relax_pipeline="smartmem")
    inputs = models.random_inputs(model, seed=9)
    runner = RPCRunner(rpc_tracker, "loopback", device=device, repeat=2, number=1, warmup=1)
    assert_matches(runner.outputs(ex, list(inputs.values()), params),
                   numerics.onnxruntime_reference(model, inputs))
    result = runner.run(ex, list(inputs.values()), params)
    assert result.device == device and len(result.samples_ms) == 2


def test_rpc_runner_unknown_key(rpc_tracker):
    with pytest.raises(errors.DeviceNotFoundError, match="no RPC device 'nobody'"):
        RPCRunner(rpc_tracker, "nobody", session_timeout=5)


# -- CLI -----------------------------------------------------------------------------------


def test_cli_devices_lists_the_opencl_device(dev, cli):
    code, stdout, stderr = cli("devices")
    assert code == 0, stderr
    name = opencl.describe()["devices"][0]["name"]
    assert f"opencl:0 available ({name}" in stdout


def test_cli_compile_and_run_on_opencl_locally_and_over_rpc(dev, cli, rpc_tracker, tmp_path):
    lib = tmp_path / "cnn_opencl.so"
    code, _, stderr = cli("compile", "builtin:small_cnn", "--target", "opencl", "-o", str(lib))
    assert code == 0, stderr
    code, stdout, stderr = cli("run", str(lib), "--repeat", "2", "--number", "1", "--profile")
    assert code == 0, stderr
    assert stdout.startswith("opencl (") and "per-kernel profile" in stdout
    code, stdout, stderr = cli("run", str(lib), "--device", f"rpc://{rpc_tracker}/loopback",
                               "--repeat", "2", "--number", "1", "--json")
    assert code == 0, stderr
    assert '"device": "opencl"' in stdout
    code, _, stderr = cli("run", str(lib), "--device", "rpc://nohost")
    assert code == 2 and "rpc://host:port/key" in stderr
