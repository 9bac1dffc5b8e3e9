"""One small run of every CUDA kernel, forward and backward, for compute-sanitizer (scripts/gpu_check.sh):
odd widths, both pack paths (aligned and shifted by an element), the register and wide-row norm
kernels, the probe's rows in shared memory and in global scratch, every activation of the GEMM op,
depth_cross_entropy's row kernel on both pack paths with every option.
Each result is checked against the reference, so a run that computes nonsense does not pass either."""
import torch

from acn_kernels import reference
from acn_kernels.ops import (accumulate_norm, depth_cross_entropy, hybrid_accumulate_norm, linear_act_accumulate,
                             probe_norm)
from acn_kernels.ops.linear_act_accumulate import ACTIVATIONS
from acn_kernels.tools.agreement import compare_op
from acn_kernels.tools.cases import depth_loss

DEVICE = torch.device("cuda")


def randn(*shape, dtype=torch.float32, shift=0):
    """Random values, optionally one element past a 16-byte boundary (the scalar paths)."""
    flat = torch.randn(torch.Size(shape).numel() + shift, device=DEVICE).to(dtype)
    return flat[shift:].view(shape)


def check(name, fused, ref, args, dtype, **kwargs):
    problems, _, _ = compare_op(lambda *a, **k: fused(*a, backend="cuda", **k), ref, args, dtype, 1e-4, **kwargs)
    print(f"{'FAIL' if problems else 'ok  '} {name} {dtype} {'; '.join(problems[:3])}", flush=True)
    return not problems


def main() -> int:
    torch.manual_seed(0)
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        for dim, shift in ((129, 1), (1024, 0), (9000, 0)):  # scalar, packed, wide rows
            x, y, f = (randn(7, dim, dtype=dtype, shift=shift) for _ in range(3))
            w, b = randn(dim), randn(dim)
            ok &= check(f"accumulate_norm D={dim}", accumulate_norm, reference.accumulate_norm, (x, y, w, b), dtype)
            ok &= check(f"hybrid_accumulate_norm D={dim}",
                        lambda *a, **k: hybrid_accumulate_norm(*a[:6], long_weight=a[6], **k),
                        lambda *a, **k: reference.hybrid_accumulate_norm(*a[:6], long_weight=a[6], **k),
                        (x, f, y, randn(), w, b, randn()), dtype)
        for dim in (129, 12288):  # the probe's rows in shared memory, then past 227 KB: global scratch
            xs, w, b = randn(4, 5, dim, dtype=dtype), randn(dim), randn(dim)
            ok &= check(f"probe_norm D={dim}", probe_norm, reference.probe_norm, (xs, w, b), dtype)
        for activation in ACTIVATIONS:
            rows = 2 * 40 if activation == "swiglu" else 40
            args = (randn(9, 24, dtype=dtype), randn(rows, 24, dtype=dtype), randn(rows, dtype=dtype),
                    randn(9, 40, dtype=dtype))
            ok &= check(f"linear_act_accumulate {activation}", linear_act_accumulate, reference.linear_act_accumulate,
                        args, dtype, activation=activation)
        for vocab in (1001, 4096):  # the scalar path, then 16-byte packs
            targets = torch.randint(0, vocab, (11,), device=DEVICE)
            targets[::3] = -100
            args = (randn(3, 11, 64, dtype=dtype), targets, randn(64, dtype=dtype), randn(64, dtype=dtype),
                    randn(vocab, 64, dtype=dtype) / 8, torch.rand(3, device=DEVICE), randn(vocab, dtype=dtype))
            ok &= check(f"depth_cross_entropy V={vocab}", depth_loss(depth_cross_entropy, chunk_rows=7),
                        depth_loss(reference.depth_cross_entropy), args, dtype, label_smoothing=0.1, z_loss=1e-3,
                        softcap=20.0)
    torch.cuda.synchronize()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
