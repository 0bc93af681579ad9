"""Built-in ONNX models, built in memory with ``onnx.helper`` (no download, no torch).

They are small but shaped like the real networks this project targets, so that the CLI's
default job, the tests and the tutorials exercise the same layout problems the model zoo has:

* :func:`bert_layer` -- one post-LN transformer encoder layer: head split (reshape + transpose),
  ``K^T``, scaled softmax attention, head merge, GELU MLP.  Stock TVM leaves four pure
  data-movement kernels here.
* :func:`swin_block` -- one shifted-window Swin block: cyclic shift (``Slice`` + ``Concat``, which
  is how exporters spell ``torch.roll``), window partition / reverse (6-d reshape + transpose),
  relative-position bias gathered from a table by an int64 index, the shift mask.
* :func:`small_cnn` -- conv, batch-norm, relu, pool, depthwise, pointwise, residual, GAP, FC;
* :func:`vit_block`, :func:`convnext_block` (NCHW <-> NHWC permutes around layernorm),
  :func:`mobilevit_block` (unfold / fold), :func:`llm_block` (head split / merge, rotary,
  grouped KV heads).

Reshape targets are int64 *initializers* on purpose: that is what exporters emit and what breaks
``keep_params_in_input=True`` in TVM's own importer (see :mod:`tvm_smartmem.frontend`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class _GraphBuilder:
    """Accumulates nodes and initializers with unique names; keeps the builders short."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def weight(self, shape: tuple[int, ...], scale: float | None = None, name: str = "w") -> str:
        """A random float32 weight, scaled like a Kaiming init so activations stay O(1)."""
        fan_in = shape[0] if len(shape) <= 2 else int(np.prod(shape[1:]))
        scale = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
        arr = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        return self.const(arr, name)

    def const(self, arr: np.ndarray, name: str = "c") -> str:
        name = self._name(name)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def shape(self, dims: list[int]) -> str:
        """An int64 shape initializer (the exporters' way of spelling a static reshape)."""
        return self.const(np.array(dims, dtype=np.int64), "shape")

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self._name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def linear(self, x: str, d_in: int, d_out: int) -> str:
        y = self.op("MatMul", [x, self.weight((d_in, d_out))])
        return self.op("Add", [y, self.weight((d_out,), scale=0.02, name="b")])

    def layer_norm(self, x: str, dim: int) -> str:
        gamma = self.const((1.0 + 0.1 * self.rng.standard_normal(dim)).astype(np.float32), "g")
        beta = self.weight((dim,), scale=0.1, name="beta")
        return self.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-5)

    def gelu(self, x: str) -> str:
        """GELU the way the exporters write it: x * 0.5 * (1 + erf(x / sqrt(2)))."""
        t = self.op("Div", [x, self.const(np.array(np.sqrt(2.0), np.float32), "sqrt2")])
        t = self.op("Erf", [t])
        t = self.op("Add", [t, self.const(np.array(1.0, np.float32), "one")])
        t = self.op("Mul", [x, t])
        return self.op("Mul", [t, self.const(np.array(0.5, np.float32), "half")])

    def model(
        self, name: str, inputs: list[onnx.ValueInfoProto], output: str, out_shape: list
    ) -> onnx.ModelProto:
        out = helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)
        graph = helper.make_graph(self.nodes, name, inputs, [out], initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def _attention(
    g: _GraphBuilder, x: str, tokens: int, dim: int, heads: int, batch: int | str,
    bias: str | None = None,
) -> str:
    """Multi-head self-attention on x:[batch, tokens, dim] with the exporters' head split/merge."""
    dh = dim // heads
    b = -1 if isinstance(batch, str) else batch
    q = g.linear(x, dim, dim)
    k = g.linear(x, dim, dim)
    v = g.linear(x, dim, dim)
    split = g.shape([b, tokens, heads, dh])
    q = g.op("Transpose", [g.op("Reshape", [q, split])], perm=[0, 2, 1, 3])
    k = g.op("Transpose", [g.op("Reshape", [k, split])], perm=[0, 2, 3, 1])
    v = g.op("Transpose", [g.op("Reshape", [v, split])], perm=[0, 2, 1, 3])
    s = g.op("MatMul", [q, k])
    s = g.op("Div", [s, g.const(np.array(np.sqrt(dh), np.float32), "scale")])
    if bias is not None:
        s = g.op("Add", [s, bias])
    p = g.op("Softmax", [s], axis=-1)
    o = g.op("MatMul", [p, v])
    o = g.op("Transpose", [o], perm=[0, 2, 1, 3])
    o = g.op("Reshape", [o, g.shape([b, tokens, dim])])
    return g.linear(o, dim, dim)


def bert_layer(
    seq: int = 32, hidden: int = 64, heads: int = 4, batch: int | str = 1, seed: int = 0
) -> onnx.ModelProto:
    """One BERT encoder layer (post-LN).  ``batch`` may be a name to make it symbolic."""
    g = _GraphBuilder(seed)
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, hidden])
    mask = g.const(
        np.where(np.arange(seq)[None, None, None, :] < seq - 2, 0.0, -1e4).astype(np.float32),
        "mask",
    )
    a = _attention(g, "x", seq, hidden, heads, batch, bias=mask)
    h = g.layer_norm(g.op("Add", ["x", a]), hidden)
    f = g.linear(g.gelu(g.linear(h, hidden, 4 * hidden)), 4 * hidden, hidden)
    y = g.layer_norm(g.op("Add", [h, f]), hidden)
    return g.model("bert_layer", [x_in], y, [batch, seq, hidden])


def _roll_hw(g: _GraphBuilder, x: str, shift: int, height: int, width: int) -> str:
    """torch.roll(x, (shift, shift), dims=(1, 2)) as exporters emit it: Slice + Concat per axis."""
    for axis, size in ((1, height), (2, width)):
        s = shift % size
        head = g.op("Slice", [x, g.shape([size - s]), g.shape([size]), g.shape([axis])])
        tail = g.op("Slice", [x, g.shape([0]), g.shape([size - s]), g.shape([axis])])
        x = g.op("Concat", [head, tail], axis=axis)
    return x


def _relative_position_index(ws: int) -> np.ndarray:
    coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
    return (rel[..., 0] * (2 * ws - 1) + rel[..., 1]).reshape(-1).astype(np.int64)


def _shift_mask(height: int, width: int, ws: int, shift: int) -> np.ndarray:
    img = np.zeros((height, width))
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[hs, wsl] = cnt
            cnt += 1
    win = img.reshape(height // ws, ws, width // ws, ws).transpose(0, 2, 1, 3).reshape(-1, ws * ws)
    mask = np.where(win[:, None, :] != win[:, :, None], -100.0, 0.0)
    return mask[:, None].astype(np.float32)  # [nW, 1, N, N]


def swin_block(
    resolution: int = 8, dim: int = 32, heads: int = 2, window: int = 4, shift: int = 2,
    batch: int = 1, seed: int = 0,
) -> onnx.ModelProto:
    """One shifted-window Swin block on x:[batch, resolution**2, dim]."""
    g = _GraphBuilder(seed)
    hw, ws, n = resolution, window, window * window
    nw = (hw // ws) ** 2
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, hw * hw, dim])
    t = g.layer_norm("x", dim)
    t = g.op("Reshape", [t, g.shape([batch, hw, hw, dim])])
    if shift:
        t = _roll_hw(g, t, -shift, hw, hw)
    # window partition, its target computed from the runtime shape the way timm writes it
    # (x.view(B, H // ws, ws, W // ws, ws, C)): Shape -> Gather -> Div by an int64 initializer
    dims = g.op("Shape", [t])
    h_w = g.op("Gather", [dims, g.shape([1, 2])], axis=0)
    nwin = g.op("Div", [h_w, g.shape([ws])])
    nwin_h = g.op("Slice", [nwin, g.shape([0]), g.shape([1])])
    nwin_w = g.op("Slice", [nwin, g.shape([1]), g.shape([2])])
    target = g.op(
        "Concat", [g.shape([batch]), nwin_h, g.shape([ws]), nwin_w, g.shape([ws, dim])], axis=0
    )
    t = g.op("Reshape", [t, target])
    t = g.op("Transpose", [t], perm=[0, 1, 3, 2, 4, 5])
    # exporters assemble this target from pieces: shape arithmetic on int64 initializers
    target = g.op("Concat", [g.shape([-1]), g.shape([n, dim])], axis=0)
    t = g.op("Reshape", [t, target])
    # relative position bias: table[(2ws-1)^2, heads] gathered by an int64 index
    table = g.weight(((2 * ws - 1) ** 2, heads), scale=0.02, name="rpb_table")
    idx = g.const(_relative_position_index(ws), "rp_index")
    bias = g.op("Gather", [table, idx], axis=0)
    bias = g.op("Reshape", [bias, g.shape([n, n, heads])])
    bias = g.op("Transpose", [bias], perm=[2, 0, 1])
    bias = g.op("Unsqueeze", [bias, g.shape([0])])  # [1, heads, N, N]
    if shift:
        mask = g.const(_shift_mask(hw, hw, ws, shift), "shift_mask")  # [nW, 1, N, N]
        bias = g.op("Add", [bias, mask])  # [nW, heads, N, N]
        if batch > 1:
            bias = g.op("Tile", [bias, g.shape([batch, 1, 1, 1])])
    a = _attention(g, t, n, dim, heads, nw * batch, bias=bias)
    # window reverse
    a = g.op("Reshape", [a, g.shape([batch, hw // ws, hw // ws, ws, ws, dim])])
    a = g.op("Transpose", [a], perm=[0, 1, 3, 2, 4, 5])
    a = g.op("Reshape", [a, g.shape([batch, hw, hw, dim])])
    if shift:
        a = _roll_hw(g, a, shift, hw, hw)
    a = g.op("Reshape", [a, g.shape([batch, hw * hw, dim])])
    h = g.op("Add", ["x", a])
    f = g.linear(g.gelu(g.linear(g.layer_norm(h, dim), dim, 4 * dim)), 4 * dim, dim)
    y = g.op("Add", [h, f])
    return g.model("swin_block", [x_in], y, [batch, hw * hw, dim])


def small_cnn(
    size: int = 32, channels: int = 16, classes: int = 10, seed: int = 0
) -> onnx.ModelProto:
    """A MobileNet-flavoured CNN on x:[1, 3, size, size] (NCHW)."""
    g = _GraphBuilder(seed)
    c = channels
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])
    t = g.op("Conv", ["x", g.weight((c, 3, 3, 3)), g.weight((c,), 0.1, "b")], pads=[1, 1, 1, 1])
    bn = [
        g.const((1.0 + 0.1 * g.rng.standard_normal(c)).astype(np.float32), "bn_scale"),
        g.weight((c,), 0.1, "bn_bias"),
        g.weight((c,), 0.1, "bn_mean"),
        g.const((1.0 + 0.1 * np.abs(g.rng.standard_normal(c))).astype(np.float32), "bn_var"),
    ]
    t = g.op("Relu", [g.op("BatchNormalization", [t, *bn], epsilon=1e-5)])
    t = g.op("MaxPool", [t], kernel_shape=[2, 2], strides=[2, 2])
    r = t
    t = g.op("Conv", [t, g.weight((c, 1, 3, 3))], pads=[1, 1, 1, 1], group=c)
    t = g.op("Clip", [t, g.const(np.array(0.0, np.float32)), g.const(np.array(6.0, np.float32))])
    t = g.op("Conv", [t, g.weight((c, c, 1, 1)), g.weight((c,), 0.1, "b")])
    t = g.op("Add", [t, r])
    t = g.op("GlobalAveragePool", [t])
    t = g.op("Flatten", [t], axis=1)
    y = g.op("Gemm", [t, g.weight((classes, c)), g.weight((classes,), 0.1, "b")], transB=1)
    return g.model("small_cnn", [x_in], y, [1, classes])


def vit_block(tokens: int = 17, dim: int = 48, heads: int = 3, patch: int = 4,
              image: int = 16, seed: int = 0) -> onnx.ModelProto:
    """Patch embedding (conv, flatten, NCHW -> tokens transpose, class token) + one pre-LN
    encoder block, on x:[1, 3, image, image]."""
    g = _GraphBuilder(seed)
    n = (image // patch) ** 2
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, image, image])
    t = g.op("Conv", ["x", g.weight((dim, 3, patch, patch)), g.weight((dim,), 0.1, "b")],
             strides=[patch, patch])
    t = g.op("Reshape", [t, g.shape([1, dim, n])])
    t = g.op("Transpose", [t], perm=[0, 2, 1])  # [1, n, dim]
    cls = g.weight((1, 1, dim), 0.02, "cls")
    t = g.op("Concat", [cls, t], axis=1)  # [1, n + 1, dim]
    t = g.op("Add", [t, g.weight((1, n + 1, dim), 0.02, "pos")])
    a = _attention(g, g.layer_norm(t, dim), n + 1, dim, heads, 1)
    t = g.op("Add", [t, a])
    f = g.linear(g.gelu(g.linear(g.layer_norm(t, dim), dim, 2 * dim)), 2 * dim, dim)
    y = g.op("Add", [t, f])
    return g.model("vit_block", [x_in], y, [1, n + 1, dim])


def convnext_block(size: int = 8, dim: int = 16, seed: int = 0) -> onnx.ModelProto:
    """ConvNeXt block: depthwise 7x7 conv (NCHW), permute to NHWC, layernorm, MLP, layer scale,
    permute back to NCHW, residual -- the NCHW <-> NHWC permutes around layernorm."""
    g = _GraphBuilder(seed)
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dim, size, size])
    t = g.op("Conv", ["x", g.weight((dim, 1, 7, 7)), g.weight((dim,), 0.1, "b")],
             pads=[3, 3, 3, 3], group=dim)
    t = g.op("Transpose", [t], perm=[0, 2, 3, 1])  # NHWC
    t = g.layer_norm(t, dim)
    t = g.linear(g.gelu(g.linear(t, dim, 4 * dim)), 4 * dim, dim)
    t = g.op("Mul", [t, g.weight((dim,), 0.5, "gamma")])
    t = g.op("Transpose", [t], perm=[0, 3, 1, 2])  # back to NCHW
    y = g.op("Add", ["x", t])
    return g.model("convnext_block", [x_in], y, [1, dim, size, size])


def mobilevit_block(size: int = 8, dim: int = 16, patch: int = 2, seed: int = 0
                    ) -> onnx.ModelProto:
    """MobileViT's unfold -> transformer -> fold on x:[1, dim, size, size]: patches of
    patch x patch pixels become sequences (reshape/transpose both ways)."""
    g = _GraphBuilder(seed)
    p, n = patch * patch, (size // patch) ** 2
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dim, size, size])
    t = g.op("Conv", ["x", g.weight((dim, dim, 1, 1))])
    # unfold: [1, C, H, W] -> [1, C, H/p, p, W/p, p] -> [1, p, p, H/p, W/p, C] -> [p*p, n, C]
    t = g.op("Reshape", [t, g.shape([1, dim, size // patch, patch, size // patch, patch])])
    t = g.op("Transpose", [t], perm=[0, 3, 5, 2, 4, 1])
    t = g.op("Reshape", [t, g.shape([p, n, dim])])
    a = _attention(g, g.layer_norm(t, dim), n, dim, 2, p)
    t = g.op("Add", [t, a])
    # fold back
    t = g.op("Reshape", [t, g.shape([1, patch, patch, size // patch, size // patch, dim])])
    t = g.op("Transpose", [t], perm=[0, 5, 3, 1, 4, 2])
    t = g.op("Reshape", [t, g.shape([1, dim, size, size])])
    t = g.op("Conv", [t, g.weight((dim, dim, 1, 1))])
    y = g.op("Add", ["x", t])
    return g.model("mobilevit_block", [x_in], y, [1, dim, size, size])


def llm_block(seq: int = 16, dim: int = 32, heads: int = 4, kv_heads: int = 2, seed: int = 0
              ) -> onnx.ModelProto:
    """A LLaMA-style prefill block: RMSNorm, Q/K/V head split, rotary embedding (slice /
    negate / concat halves), grouped KV heads expanded to the query heads, causal softmax,
    head merge, SwiGLU MLP."""
    g = _GraphBuilder(seed)
    dh = dim // heads
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, dim])

    def rms(x):
        sq = g.op("Mul", [x, x])
        mean = g.op("ReduceMean", [sq], axes=[-1], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean, g.const(
            np.array(1e-6, np.float32), "eps")])])])
        return g.op("Mul", [g.op("Mul", [x, inv]), g.weight((dim,), 0.1, "rms")])

    def rotary(t, n_heads):  # t: [1, n_heads, seq, dh]
        half = dh // 2
        pos = np.arange(seq)[:, None] / (10000 ** (np.arange(half) / half))[None, :]
        cos = g.const(np.concatenate([np.cos(pos)] * 2, -1).astype(np.float32), "cos")
        sin = g.const(np.concatenate([np.sin(pos)] * 2, -1).astype(np.float32), "sin")
        x1 = g.op("Slice", [t, g.shape([0]), g.shape([half]), g.shape([3])])
        x2 = g.op("Slice", [t, g.shape([half]), g.shape([dh]), g.shape([3])])
        rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=3)
        return g.op("Add", [g.op("Mul", [t, cos]), g.op("Mul", [rot, sin])])

    h = rms("x")
    q = g.op("MatMul", [h, g.weight((dim, dim))])
    k = g.op("MatMul", [h, g.weight((dim, kv_heads * dh))])
    v = g.op("MatMul", [h, g.weight((dim, kv_heads * dh))])
    q = g.op("Transpose", [g.op("Reshape", [q, g.shape([1, seq, heads, dh])])], perm=[0, 2, 1, 3])
    k = g.op("Transpose", [g.op("Reshape", [k, g.shape([1, seq, kv_heads, dh])])],
             perm=[0, 2, 1, 3])
    v = g.op("Transpose", [g.op("Reshape", [v, g.shape([1, seq, kv_heads, dh])])],
             perm=[0, 2, 1, 3])
    q, k = rotary(q, heads), rotary(k, kv_heads)
    rep = heads // kv_heads  # KV layout: [1, kv, seq, dh] -> [1, kv, rep, seq, dh] -> [1, h, ..]
    k = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [k, g.shape([2])]),
                                           g.shape([1, kv_heads, rep, seq, dh])]),
                         g.shape([1, heads, seq, dh])])
    v = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [v, g.shape([2])]),
                                           g.shape([1, kv_heads, rep, seq, dh])]),
                         g.shape([1, heads, seq, dh])])
    causal = g.const(np.triu(np.full((seq, seq), -1e4, np.float32), 1), "causal")
    s = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    s = g.op("Add", [g.op("Div", [s, g.const(np.array(np.sqrt(dh), np.float32), "scale")]),
                     causal])
    o = g.op("MatMul", [g.op("Softmax", [s], axis=-1), v])
    o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), g.shape([1, seq, dim])])
    t = g.op("Add", ["x", g.op("MatMul", [o, g.weight((dim, dim))])])
    m = rms(t)
    gate = g.op("MatMul", [m, g.weight((dim, 2 * dim))])
    up = g.op("MatMul", [m, g.weight((dim, 2 * dim))])
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    y = g.op("Add", [t, g.op("MatMul", [act, g.weight((2 * dim, dim))])])
    return g.model("llm_block", [x_in], y, [1, seq, dim])


BUILTIN: dict[str, Callable[[], onnx.ModelProto]] = {
    "bert_layer": bert_layer,
    "swin_block": swin_block,
    "small_cnn": small_cnn,
    "vit_block": vit_block,
    "convnext_block": convnext_block,
    "mobilevit_block": mobilevit_block,
    "llm_block": llm_block,
}


def get(name: str) -> onnx.ModelProto:
    """A built-in model by name (see :data:`BUILTIN`)."""
    from .errors import ModelLoadError

    if name not in BUILTIN:
        raise ModelLoadError(f"unknown built-in model '{name}'; known: {', '.join(BUILTIN)}")
    return BUILTIN[name]()


def signature_inputs(signature: list[dict], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for a module's input signature (``frontend.input_signature``): token ids
    in [0, 1000) -- small enough for every vocabulary of the zoo -- and normal floats."""
    rng = np.random.default_rng(seed)
    out = {}
    for sig in signature:
        if sig["dtype"].startswith("int"):
            out[sig["name"]] = rng.integers(0, 1000, sig["shape"]).astype(sig["dtype"])
        else:
            out[sig["name"]] = rng.standard_normal(sig["shape"]).astype(sig["dtype"])
    return out


def random_inputs(model: onnx.ModelProto, seed: int = 0, dims: dict[str, int] | None = None):
    """Random float32 / int64 inputs matching the model's declared inputs.

    Symbolic dims are resolved from ``dims`` (name -> size), default 1.
    """
    rng = np.random.default_rng(seed)
    init_names = {i.name for i in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.dim_value > 0 else (dims or {}).get(d.dim_param, 1)
                 for d in tt.shape.dim]
        np_dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(np_dtype, np.integer):
            out[vi.name] = rng.integers(0, 8, size=shape).astype(np_dtype)
        else:
            out[vi.name] = rng.standard_normal(shape).astype(np_dtype)
    return out
