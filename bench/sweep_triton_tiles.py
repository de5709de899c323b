"""Sweep the Triton loss kernels' tile (``BLOCK`` vocabulary columns per step, ``num_warps``) on a
GPU: forward+backward of the mean loss through the public API, as ``bench/bench_gpu.py``
measures it, for every (BLOCK, num_warps) pair, beside the tile that ``kernels/losses.py``'s
``_block`` heuristic picks. The data for that heuristic; ``--dry-run`` runs the sweep on tiny
CPU shapes through the interpreter (how the script is tested here).

    python bench/sweep_triton_tiles.py --out DIR [--v 128256] [--k 1 3] [--losses forward_kl ...]

Writes ``DIR/tiles.json`` (rewritten after each measurement) and prints one line per loss and K:
the best tile, its time and bandwidth against the heuristic's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gpu  # noqa: E402  (the same inputs, byte model and measurement as the benchmark)
from bench_gpu import positive_float, positive_int  # noqa: E402


def sweep(args) -> dict:
    # imported here: a dry run sets TRITON_INTERPRET first (the kernels read it when imported)
    from mtbkd.kernels import losses as kl

    device = "cpu" if args.dry_run else "cuda"
    dtype = bench_gpu.DTYPES[args.dtype]
    elem = torch.finfo(dtype).bits // 8
    copy_gbs = bench_gpu.copy_bandwidth_gbs(device, args.copy_bytes)
    out = {"device": bench_gpu._device_name(device), "torch": torch.__version__, "N": args.n,
           "dtype": args.dtype, "copy_bandwidth_gbs": copy_gbs, "runs": []}  # fmt: skip
    heuristic = kl._block
    start = time.time()
    try:
        for k in args.k:
            z, t, y = bench_gpu.make_inputs(args.n, args.v, k, dtype, device)
            stats = bench_gpu.TeacherStats(t)
            kp = 1 << (k - 1).bit_length()
            default = heuristic(args.v, kp, elem)
            for loss in args.losses:
                nbytes = bench_gpu.passes_bytes(loss, args.n, args.v, k, elem)
                run = {"loss": loss, "V": args.v, "K": k, "heuristic": list(default), "tiles": []}
                out["runs"].append(run)
                for block in args.blocks:
                    for warps in args.warps:
                        if time.time() - start > args.budget_s:
                            run["stopped"] = "time budget"
                            break
                        kl._block = _fixed_tile(block, warps)
                        try:
                            fn = bench_gpu._fused(loss, "triton")
                            m = bench_gpu.measure(fn, z, t, y, stats, device, nbytes, args.reps)
                            m["pct_copy_bw"] = 100 * m["gbs"] / copy_gbs
                        except Exception as exc:  # a tile that does not compile or fit
                            m = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                        run["tiles"].append({"block": block, "warps": warps, **m})
                        _save(out, args.out)
                ok = [e for e in run["tiles"] if "median_ms" in e]
                if ok:
                    best = min(ok, key=lambda e: e["median_ms"])
                    mine = [e for e in ok if [e["block"], e["warps"]] == list(default)]
                    run["best"] = {"block": best["block"], "warps": best["warps"],
                                   "median_ms": best["median_ms"],
                                   "pct_copy_bw": best["pct_copy_bw"]}  # fmt: skip
                    line = (
                        f"{loss:>13} K={k}: best BLOCK={best['block']:5d} "
                        f"warps={best['warps']:2d} {best['median_ms']:8.3f} ms "
                        f"{best['pct_copy_bw']:5.1f}%"
                    )
                    if mine:
                        line += (
                            f" | heuristic {default[0]}/{default[1]} "
                            f"{mine[0]['median_ms']:8.3f} ms {mine[0]['pct_copy_bw']:5.1f}%"
                        )
                    print(line, flush=True)
            del z, t, y, stats
    finally:
        kl._block = heuristic
        os.environ.pop("MTBKD_BACKEND", None)
    out["elapsed_s"] = time.time() - start
    _save(out, args.out)
    return out


def _fixed_tile(block: int, warps: int):
    def tile(v: int, kp: int, elem_bytes: int) -> tuple[int, int]:
        return min(block, 1 << max(0, v - 1).bit_length()), warps

    return tile


def _save(out: dict, folder) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / "tiles.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU shapes (tests the script)")
    p.add_argument("--n", type=positive_int, default=8192)
    p.add_argument("--v", type=positive_int, default=128256)
    p.add_argument("--k", type=positive_int, nargs="+", default=[3])
    p.add_argument("--dtype", default="bfloat16", choices=sorted(bench_gpu.DTYPES))
    p.add_argument("--losses", nargs="+", default=["forward_kl", "reverse_kl", "mtbkd_cached"],
                   choices=bench_gpu.LOSSES)  # fmt: skip
    p.add_argument("--blocks", type=positive_int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--warps", type=positive_int, nargs="+", default=[4, 8, 16])
    p.add_argument(
        "--reps", type=positive_int, default=100, help="do_bench time budget per tile, ms"
    )
    p.add_argument("--budget-s", type=positive_float, default=240.0,
                   help="stop starting tiles after this")  # fmt: skip
    p.add_argument("--copy-bytes", type=positive_int, default=2**31)
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels on CPU tensors
        args.n, args.v, args.copy_bytes = 3, 50, 2**16
        args.blocks = [a for a in args.blocks if a <= 64] or [16, 32]
        args.warps = args.warps[:1]
    elif not torch.cuda.is_available():
        p.error("no CUDA device: use --dry-run on a machine without a GPU")
    out = sweep(args)
    if not any("best" in r for r in out["runs"]):  # every tile failed (see tiles.json)
        print(f"no tile was measured: see the errors in {Path(args.out) / 'tiles.json'}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
