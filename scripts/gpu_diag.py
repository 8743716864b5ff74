"""Minimal CUDA op calls, one step per line (diagnosis of a host-side crash)."""
import faulthandler
import sys

import torch

faulthandler.enable()

from adaptfuse import _C, ops  # noqa: E402

family = sys.argv[1] if len(sys.argv) > 1 else "auto"
dtype = getattr(torch, sys.argv[2]) if len(sys.argv) > 2 else torch.float32
_C.kernel_family(family)
dev = "cuda"
torch.manual_seed(0)
T, H_in, H_out, S, R = 40, 64, 64, 2, 8
x = torch.randn(T, H_in, device=dev, dtype=dtype)
A = torch.randn(S, R, H_in, device=dev, dtype=dtype)
B = torch.randn(S, R, H_out, device=dev, dtype=dtype)
ranks = torch.tensor([8, 8], dtype=torch.int32, device=dev)
scales = torch.ones(S, device=dev)
slots = torch.tensor([0, 1, 0, -1] * 10, dtype=torch.int32, device=dev)
plan = ops.plan(slots, S)
torch.cuda.synchronize()
print(family, dtype, "plan ok", plan.slot_offsets.tolist(), flush=True)
v = ops.shrink(x, A, ranks, scales, plan)
torch.cuda.synchronize()
print("shrink ok", float(v.abs().sum()), flush=True)
y = torch.zeros(T, H_out, device=dev, dtype=dtype)
print("calling expand_", flush=True)
ops.expand_(y, v, [B], [0], ranks, plan)
torch.cuda.synchronize()
print("expand ok", float(y.float().abs().sum()), flush=True)
W = torch.randn(H_out, H_in, device=dev, dtype=dtype)
print("calling merge_", flush=True)
record = ops.merge_(W, [A[0]], [B[0]], [0.5])
torch.cuda.synchronize()
print("merge ok", flush=True)
