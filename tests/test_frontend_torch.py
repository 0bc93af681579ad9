"""The torch.export route: a torch attention block against eager PyTorch."""

from __future__ import annotations

import pytest
import tvm
from conftest import LLVM, assert_matches, run_vm

from tvm_smartmem import errors, frontend
from tvm_smartmem.pipeline import baseline

torch = pytest.importorskip("torch", reason="the torch route needs the optional torch install")


class _Attention(torch.nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
        return x + self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


def test_torch_export_route_matches_eager():
    torch.manual_seed(0)
    module = _Attention().eval()
    x = torch.randn(2, 16, 32)
    mod, params = frontend.from_torch(module, (x,))
    assert len(params) == len(list(module.parameters()))
    assert frontend.input_signature(mod)[0]["shape"] == [2, 16, 32]
    with torch.no_grad():
        ref = module(x).numpy()
    ex = tvm.compile(mod, LLVM, relax_pipeline=baseline(LLVM))
    assert_matches(run_vm(ex, [x.numpy()], params=params), [ref])


def test_torch_export_route_rejects_a_plain_module():
    with pytest.raises(errors.ModelLoadError, match="ExportedProgram"):
        frontend.from_exported_program(_Attention())
