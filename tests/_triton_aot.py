"""Compile the Triton kernels ahead of time for sm_80 and sm_90 without a GPU.

Run as a script (``python tests/_triton_aot.py [arch ...]``) in a process *without*
``TRITON_INTERPRET``: the interpreter replaces ``triton.jit`` functions, so compilation needs a
fresh process. Each case calls the real host wrapper of :mod:`mtbkd.kernels.losses` with a
recorder in place of the kernel, then compiles exactly the recorded launch (argument types,
constexpr specialisation, ``num_warps``) to a cubin with Triton's bundled ``ptxas``. This catches
what the interpreter cannot: type errors in the generated IR, unsupported constructs, register
spills. Prints one JSON line per compiled kernel.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

_TYPES = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
}


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` is recorded."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, kwargs))

        return launch


def _compile(fn, args, kwargs, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    names = fn.arg_names
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    signature, constexprs = {}, {}
    for i, name in enumerate(names):
        value = bound[name]
        param = fn.params[i]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = False if name == "INTERPRET" else value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
        elif param.annotation_type:
            signature[name] = param.annotation_type
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"cannot type argument {name}={value!r}")
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _resources(cubin: bytes) -> dict:
    """Registers and local memory (spills) of a cubin, read with Triton's bundled cuobjdump."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=False).stdout  # fmt: skip
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        return {}
    return dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups()), strict=True))


def _cases():
    """``(label, kernel attribute, thunk calling the host wrapper)`` of representative launches."""
    from mtbkd.kernels import losses as L

    g = torch.Generator().manual_seed(0)

    def data(k, n=4, v=1000, dtype=torch.bfloat16, stacked=True):
        z = torch.randn(n, v, generator=g).to(dtype)
        t = torch.randn(k, n, v, generator=g).to(dtype)
        ts = list(t.unbind(0)) if stacked else [x.clone() for x in t]
        y = torch.randint(0, v, (n,), generator=g)
        return z, ts, y

    acc = lambda dt: torch.float64 if dt == torch.float64 else torch.float32
    cases = []
    # bf16 with stacked teachers (the benchmark case), fp16 with five separate pointers, fp64.
    for dtype, k, stacked in ((torch.bfloat16, 3, True), (torch.float16, 5, False),
                              (torch.float64, 1, True)):  # fmt: skip
        z, ts, y = data(k, dtype=dtype, stacked=stacked)
        stats = torch.zeros(k, z.shape[0], 4, dtype=acc(dtype))
        fw = torch.ones(k, z.shape[0], dtype=acc(dtype))
        gs = torch.tensor([0.25], dtype=acc(dtype))  # a mean's grad_scale (HAS_GS)
        tag = f"{dtype}".replace("torch.", "") + f"-K{k}-{'stacked' if stacked else 'pointers'}"
        cases.append(
            (
                f"mtbkd-{tag}",
                "_mtbkd_fwd_kernel",
                lambda z=z, ts=ts, y=y, gs=gs: L.mtbkd_loss_fwd(
                    z, ts, y, None, None, 2.0, 5.0, 0.02, 1.0, 0, 1.0, -100, True, gs
                ),
            )
        )
        cases.append(
            (
                f"mtbkd-cached-{tag}",
                "_mtbkd_fwd_kernel",
                lambda z=z, ts=ts, s=stats, fw=fw: L.mtbkd_loss_fwd(
                    z, ts, None, fw, s, 2.0, 5.0, 0.02, 1.0, 2, 1.0, -100, False
                ),
            )
        )
        for div in (0, 1, 2):
            cases.append(
                (
                    f"kd{div}-{tag}",
                    "_kd_fwd_kernel",
                    lambda z=z, ts=ts, y=y, d=div, gs=gs: L.multi_teacher_kd_fwd(
                        z, ts, y, None, d, 0.5, 2.0, 0, 1.0, 0.5, 1.0, 4.0, -100, True, gs
                    ),
                )
            )
        cases.append(
            (f"weights-{tag}", "_teacher_kernel", lambda ts=ts: L.teacher_weights(ts, 0, 1.0, True))
        )
        cases.append(
            (
                f"stats-{tag}",
                "_teacher_kernel",
                lambda ts=ts: L.teacher_stats(ts, 2.0, 5.0, 1.0, False),
            )
        )
        cases.append(
            (
                f"scale-{tag}",
                "_scale_grad_kernel",
                lambda z=z: L.scale_grad(z, torch.ones(z.shape[0], dtype=acc(z.dtype))),
            )
        )
    return cases


def main(archs: list[int]) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1 (the interpreter replaces the jit functions)")
        return 2
    from mtbkd.kernels import losses as L

    L._raise_on_status = lambda *a, **k: None  # the recorder does not fill the status buffer
    failures = 0
    for label, attr, thunk in _cases():
        real = getattr(L, attr)
        rec = _Recorder(real)
        setattr(L, attr, rec)
        try:
            thunk()
        finally:
            setattr(L, attr, real)
        for args, kwargs in rec.calls:
            for arch in archs:
                t0 = time.time()
                try:
                    k = _compile(real, args, kwargs, arch)
                    out = {"case": label, "arch": arch, "ok": True,
                           "seconds": round(time.time() - t0, 2),
                           "num_warps": kwargs.get("num_warps", 4),
                           **_resources(k.asm["cubin"])}  # fmt: skip
                except Exception as exc:  # report every failing specialisation, then fail
                    failures += 1
                    out = {"case": label, "arch": arch, "ok": False, "error": str(exc)[-1500:]}
                print(json.dumps(out), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [80, 90]))
