"""
.. _tutorial-rpc-measure:

Measuring on a remote device through the RPC tracker
====================================================
Phones are measured over TVM's RPC: the phone runs TVM's RPC app (Android: ``tvm_rpc`` /
the TVM RPC APK), registers with a tracker under a key, and the host compiles, uploads and
times through :class:`tvm_smartmem.measure.RPCRunner` — the same timing protocol as
:class:`~tvm_smartmem.measure.LocalRunner`.

With a phone the set-up is::

    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190      # on the host
    # on the phone: the TVM RPC app, tracker <host ip>:9190, key "android"
    tvm-smartmem compile model.onnx --target adreno -o model.so
    tvm-smartmem run model.so --device rpc://<host ip>:9190/android/opencl

This tutorial does the same on one machine: a tracker and a server (key ``loopback``) on
127.0.0.1 stand in for the phone, so it runs anywhere.
"""

# %%
# Start a tracker and a server
# ----------------------------
# Both run in their own processes.  The server registers with the tracker under its key, as
# the phone app does.
import time

import tvm
from tvm import rpc
from tvm.rpc.tracker import Tracker

from tvm_smartmem import frontend, models, numerics, targets
from tvm_smartmem.measure import RPCRunner

tracker = Tracker("127.0.0.1", port=9190, port_end=9390, silent=True)
server = rpc.Server(host="127.0.0.1", port=9400, port_end=9600, key="loopback",
                    tracker_addr=("127.0.0.1", tracker.port), silent=True, no_fork=True)
tracker_addr = f"127.0.0.1:{tracker.port}"
deadline = time.time() + 60
while "loopback" not in rpc.connect_tracker("127.0.0.1", tracker.port).summary().get(
        "queue_info", {}):
    assert time.time() < deadline, "the server did not register with the tracker"
    time.sleep(0.5)
print(f"tracker at {tracker_addr}, a device registered under key 'loopback'")

# %%
# Compile for the remote device
# -----------------------------
# The loopback "device" is this machine's CPU; for a phone use ``targets.get("adreno")``
# (OpenCL with an aarch64 Android host).
onnx_model = models.small_cnn()
mod, params = frontend.from_onnx(onnx_model)
ex = tvm.compile(mod, targets.get("llvm"), relax_pipeline="smartmem")

# %%
# Run and time through the tracker
# --------------------------------
# The runner asks the tracker for a device with the key, uploads the library (exported to a
# temporary file), and runs the VM remotely.  Outputs come back for the check.
try:
    runner = RPCRunner(tracker_addr, "loopback", device="cpu", repeat=3, number=2, warmup=1)
    inputs = models.random_inputs(onnx_model, seed=2)
    outs = runner.outputs(ex, list(inputs.values()), params)
    ok, err = numerics.compare(outs, numerics.onnxruntime_reference(onnx_model, inputs))
    print(f"remote outputs match ONNX Runtime: {ok} (max scale-normalised error {err:.1e})")
    assert ok
    result = runner.run(ex, list(inputs.values()), params)
    print(result.summary())
    print(result.to_json()[:200], "...")
finally:
    server.terminate()
    tracker.terminate()
