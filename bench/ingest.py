"""Ingest benchmark: weightatlas against reading with safetensors plus writing the bytes.

Side by side in one run, on generated safetensors files of transformer-like shapes:

  (a) read every tensor into memory with the safetensors library (``get_tensor().clone()``),
  (b) write the same bytes once to a new file (with fsync, as ingest does),
  (c) ``weightatlas.ingest`` into a fresh store.

Targets (issue 2): c / (a + b) <= 1.5 for float32 and bfloat16 files of >= 1 GB;
opening the store and reading one tensor in <= 5 ms and >= 100x faster than loading
the source file again; ingest of a 4 GB file with peak RSS < 1 GB above the
interpreter's baseline. Timings are medians of interleaved repeats with the files in
the page cache (dropping caches needs privileges the benchmark machines lack).

    python bench/ingest.py [--gb 1] [--rss-gb 4] [--repeats 3] [--workdir bench/_data]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import weightatlas as wa  # noqa: E402

SHAPE = (4096, 4096)  # one transformer-sized matrix per tensor


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}")


def generate(path: Path, gb: float, dtype: str) -> None:
    """Stream a safetensors file of about ``gb`` GiB of random tensors (flat memory)."""
    if path.exists():
        return
    import ml_dtypes

    np_dtype = {"F32": np.float32, "BF16": ml_dtypes.bfloat16}[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    per = SHAPE[0] * SHAPE[1] * itemsize
    n = max(1, round(gb * 2**30 / per))
    header, offset = {}, 0
    for i in range(n):
        header[f"layers.{i}.mlp.weight"] = {"dtype": dtype, "shape": list(SHAPE),
                                            "data_offsets": [offset, offset + per]}
        offset += per
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _ in range(n):
            f.write(rng.standard_normal(SHAPE, dtype=np.float32).astype(np_dtype).tobytes())
    tmp.rename(path)


def time_safetensors_read(path: Path) -> float:
    """Every tensor read into memory with the reference library.

    ``safetensors.torch.load_file`` and ``get_tensor`` return views over a memory map
    that the library caches between calls, so reading nothing; ``.clone()`` makes each
    tensor a real in-memory read (the cheapest one: a memcpy from the page cache).
    """
    from safetensors import safe_open

    t = time.perf_counter()
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            tensor = f.get_tensor(key).clone()
            del tensor
    return time.perf_counter() - t


def time_write_bytes(data: bytes, out: Path) -> float:
    t = time.perf_counter()
    with open(out, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - t
    out.unlink()
    return elapsed


def time_ingest(path: Path, store_dir: Path) -> float:
    shutil.rmtree(store_dir, ignore_errors=True)
    t = time.perf_counter()
    wa.ingest(path, store=store_dir, model="bench").close()
    return time.perf_counter() - t


def time_load_source(path: Path) -> float:
    """Load the source file again, as a user without the store would (every tensor read)."""
    return time_safetensors_read(path)


def time_open_read(store_dir: Path, name: str, n: int = 30) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        store = wa.open_store(store_dir, create=False)
        with store.snapshot("bench") as snap:
            snap.read(name)  # checksum verified
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_file(path: Path, work: Path, repeats: int) -> dict:
    size = path.stat().st_size
    data = path.read_bytes()  # for (b); also warms the page cache
    a, b, c = [], [], []
    store_dir = work / "store"
    for _ in range(repeats):  # interleaved, so drift hits all three alike
        a.append(time_safetensors_read(path))
        b.append(time_write_bytes(data, work / "copy.bin"))
        c.append(time_ingest(path, store_dir))
    del data
    ma, mb, mc = (statistics.median(x) for x in (a, b, c))
    names = wa.open_store(store_dir, create=False).snapshot("bench").names
    read_one = time_open_read(store_dir, names[len(names) // 2])
    load_again = statistics.median(time_load_source(path) for _ in range(repeats))
    shutil.rmtree(store_dir)
    return {
        "file": path.name, "bytes": size, "tensors": len(names),
        "a_safetensors_read_s": ma, "b_write_bytes_s": mb, "c_ingest_s": mc,
        "ratio_c_over_a_plus_b": mc / (ma + mb),
        "ingest_GB_per_s": size / mc / 1e9,
        "open_and_read_one_tensor_ms": read_one * 1e3,
        "tensor_MB": SHAPE[0] * SHAPE[1] * (4 if "f32" in path.name else 2) / 1e6,
        "load_source_again_s": load_again,
        "speedup_vs_loading_source": load_again / read_one,
    }


_RSS_CHILD = r"""
import sys, threading, time, psutil
sys.path.insert(0, sys.argv[3])
import weightatlas as wa, weightatlas.adapters.safetensors  # everything imported first
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.005)
t = threading.Thread(target=sample, daemon=True); t.start()
start = time.perf_counter()
wa.ingest(sys.argv[1], store=sys.argv[2], model="rss").close()
elapsed = time.perf_counter() - start
done.set(); t.join()
import resource
print(base, peak[0], elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def bench_rss(path: Path, work: Path) -> dict:
    store_dir = work / "rss_store"
    shutil.rmtree(store_dir, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path), str(store_dir),
                          str(ROOT)], capture_output=True, text=True, check=True)
    base, peak, elapsed, maxrss = out.stdout.split()
    shutil.rmtree(store_dir)
    return {"file": path.name, "bytes": path.stat().st_size, "baseline_rss_MB": int(base) / 1e6,
            "peak_rss_MB": int(peak) / 1e6, "peak_above_baseline_MB": (int(peak) - int(base)) / 1e6,
            "ru_maxrss_MB": int(maxrss) / 1e6, "ingest_s": float(elapsed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--rss-gb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_data")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    results = {"machine": machine(), "files": [], "rss": None}
    for dtype in ("F32", "BF16"):
        path = work / f"bench-{dtype.lower()}-{args.gb:g}g.safetensors"
        generate(path, args.gb, dtype)
        r = bench_file(path, work, args.repeats)
        results["files"].append(r)
        print(f"\n{r['file']}: {r['bytes'] / 1e9:.2f} GB, {r['tensors']} tensors")
        print(f"  (a) safetensors read   {r['a_safetensors_read_s']:.3f} s")
        print(f"  (b) write bytes+fsync  {r['b_write_bytes_s']:.3f} s")
        print(f"  (c) weightatlas ingest {r['c_ingest_s']:.3f} s  "
              f"({r['ingest_GB_per_s']:.2f} GB/s)")
        print(f"  c / (a + b) = {r['ratio_c_over_a_plus_b']:.2f}   (target <= 1.5)")
        print(f"  open store + read one {r['tensor_MB']:.0f} MB tensor: "
              f"{r['open_and_read_one_tensor_ms']:.2f} ms (target <= 5 ms); loading the source "
              f"again {r['load_source_again_s']:.3f} s -> {r['speedup_vs_loading_source']:.0f}x "
              "(target >= 100x)")
    if args.rss_gb > 0:
        path = work / f"bench-f32-{args.rss_gb:g}g.safetensors"
        generate(path, args.rss_gb, "F32")
        r = bench_rss(path, work)
        results["rss"] = r
        print(f"\n{r['file']}: {r['bytes'] / 1e9:.2f} GB ingested in {r['ingest_s']:.2f} s; "
              f"peak RSS {r['peak_rss_MB']:.0f} MB, {r['peak_above_baseline_MB']:.0f} MB above "
              f"the {r['baseline_rss_MB']:.0f} MB baseline (target < 1000 MB)")
    (work / "ingest-results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
