"""What the integrity manifest costs, measured on a few GB and extrapolated to a 2B4T checkpoint.

    python scripts/bench_integrity.py                # 3 GB in two files, like model + optimizer
    python scripts/bench_integrity.py --gb 6 --dir /fast/disk

A 2B4T checkpoint holds ~2.4 B fp32 parameters plus AdamW's two moments: ~29 GB in
model.safetensors (1/3) and optimizer.bin (2/3). The script writes files of the same 1:2 split
(the page cache then holds them, as it holds a checkpoint just written), then times

1. SHA-256 of one file on one thread (`integrity.hash_file`), in MB/s;
2. `build_manifest` over the directory (files hashed in parallel, largest first), the work the
   background commit thread does after every checkpoint, and `verify_manifest` (resume, load);
3. how much a launch-bound main thread (many tiny torch ops, one intra-op thread: the CPU side
   of a GPU training step) slows down while another thread hashes: hashlib and file reads
   release the GIL, so it should not.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from bitnet_train.integrity import build_manifest, hash_file, verify_manifest
from bitnet_train.model import BitNetConfig, BitNetForCausalLM


def params_2b4t() -> int:
    with torch.device("meta"):
        model = BitNetForCausalLM(BitNetConfig())  # the defaults are 2B4T
    return sum(p.numel() for p in model.parameters())


def write_files(root: Path, total_bytes: int) -> list[Path]:
    """model.safetensors (1/3) and optimizer.bin (2/3) of random bytes."""
    chunk = os.urandom(64 << 20)
    files = []
    for name, share in (("model.safetensors", 1), ("optimizer.bin", 2)):
        path = root / name
        left = total_bytes * share // 3
        with open(path, "wb") as f:
            while left > 0:
                n = min(left, len(chunk))
                f.write(chunk[:n])
                left -= n
        files.append(path)
    return files


def launch_bound_loop(n: int = 20000) -> float:
    """Seconds for n tiny torch ops: dispatcher and Python overhead, no arithmetic to speak of."""
    x = torch.zeros(8)
    t0 = time.perf_counter()
    for _ in range(n):
        x = x + 1.0
    return time.perf_counter() - t0


def _hash_forever(path: str) -> None:
    while True:
        hash_file(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=3.0, help="bytes to write and hash, in GB")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    args = p.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench_integrity_", dir=args.dir))
    try:
        total = int(args.gb * 1e9)
        files = write_files(root, total)
        big = files[1]
        t0, c0 = time.perf_counter(), time.thread_time()
        hash_file(big)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        one = big.stat().st_size / wall / 1e6
        one_cpu = big.stat().st_size / cpu / 1e6  # what one core does, whatever else runs
        t0 = time.perf_counter()
        manifest = build_manifest(root)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        verify_manifest(root, manifest)
        verify_s = time.perf_counter() - t0

        alone = min(launch_bound_loop() for _ in range(3))
        done = threading.Event()

        def hash_until_done() -> None:
            while not done.is_set():
                hash_file(files[0])

        worker = threading.Thread(target=hash_until_done)
        worker.start()
        try:
            beside = min(launch_bound_loop() for _ in range(3))
        finally:
            done.set()
            worker.join()
        # the same hashing in another process: same competition for cores, no shared GIL
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=_hash_forever, args=(str(files[0]),), daemon=True)
        proc.start()
        time.sleep(1.0)  # let it start hashing
        try:
            beside_proc = min(launch_bound_loop() for _ in range(3))
        finally:
            proc.kill()
            proc.join()

        n = params_2b4t()
        ckpt = n * 12  # fp32 weights + AdamW exp_avg + exp_avg_sq
        print(f"cores: {os.cpu_count()}; wrote {total / 1e9:.1f} GB in {root}")
        print(f"sha256, one thread: {one:.0f} MB/s wall clock, {one_cpu:.0f} MB/s per CPU "
              f"second (load average {os.getloadavg()[0]:.1f})")
        print(f"build_manifest (parallel over files): {total / build_s / 1e6:.0f} MB/s "
              f"({build_s:.2f} s); verify_manifest: {total / verify_s / 1e6:.0f} MB/s")
        print(f"launch-bound main thread: {alone * 1e3:.0f} ms alone, {beside * 1e3:.0f} ms "
              f"while another thread hashes ({(beside / alone - 1) * 100:+.0f}%), "
              f"{beside_proc * 1e3:.0f} ms while another process hashes "
              f"({(beside_proc / alone - 1) * 100:+.0f}%: competition for cores, not the GIL)")
        rate = max(one, one_cpu)  # an idle core: the CPU-time rate
        print(f"2b4t: {n / 1e9:.2f} B parameters -> checkpoint ~{ckpt / 1e9:.1f} GB; hashing "
              f"it takes ~{ckpt * 2 / 3 / 1e6 / rate:.0f} s on the background thread with two "
              f"idle cores (bounded by optimizer.bin, {ckpt * 2 / 3 / 1e9:.1f} GB), "
              f"~{ckpt / 1e6 / rate:.0f} s with one")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
