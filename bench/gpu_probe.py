"""One forward launch of each fused-loss kernel worth profiling, for ``ncu -k regex:kd_`` on a GPU:
Triton forward KL at K = 1 and K = 3, then the CUDA kernel at K = 3 (N = 2048, V = 128256, bf16).

    ncu --clock-control none --section SpeedOfLight ... -k regex:kd_ -c 3 python3 bench/gpu_probe.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_gpu  # noqa: E402

import mtbkd  # noqa: E402


def main() -> None:
    n, v = int(os.environ.get("PROBE_N", 2048)), int(os.environ.get("PROBE_V", 128256))
    for backend, k in (("triton", 1), ("triton", 3), ("cuda", 3)):
        z, t, y = bench_gpu.make_inputs(n, v, k, torch.bfloat16, "cuda")
        os.environ["MTBKD_BACKEND"] = backend
        with torch.no_grad():
            mtbkd.multi_teacher_kd_loss(z, t, y, divergence="forward_kl", temperature=2.0)
        torch.cuda.synchronize()
        print(backend, k, "done", flush=True)


if __name__ == "__main__":
    main()
