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

ONNX (issue 3, ``--only onnx``): a generated transformer-like model of ``--onnx-mb`` MB
(>= 500) with external data, half its weights ``MatMul`` initializers stored ``[in, out]``
(as the TorchScript exporter writes them, so ingest transposes them) and half ``Gemm``
weights with ``transB=1``, against (a) ``onnx.load`` plus ``numpy_helper.to_array`` of
every initializer; (b) writing the same bytes with fsync is shown too, since ingest
writes a snapshot and (a) writes nothing. Target: ingest <= 1.5x (a); peak RSS bounded
by the largest tensor, not the model (both measured in child processes).

    python bench/ingest.py [--gb 1] [--rss-gb 4] [--repeats 3] [--workdir bench/_data]
                           [--only all|safetensors|onnx] [--onnx-mb 600]

``--workdir /dev/shm/wa-bench`` puts the generated files and the stores on tmpfs, which
takes the disk (ext4, its write-back and fsync) out of the figures and leaves the
software. The load average is printed before and after: the timings are only as quiet
as the machine.
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


# The child processes' RSS sampler: everything is imported first, then `base` is taken
# and a thread samples the peak every 5 ms from `start` until `done` is set.
_RSS_SAMPLER = r"""
import sys, threading, time, psutil
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
"""

_RSS_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[3])
import weightatlas as wa, weightatlas.adapters.safetensors
""" + _RSS_SAMPLER + r"""
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


# ---- ONNX ------------------------------------------------------------------------------

ONNX_DIM = 1024  # blocks of d -> 4d -> d: 16 MB float32 matrices


def generate_onnx(path: Path, mb: float) -> None:
    """Stream a model of about ``mb`` MB into ``path`` plus ``path.data`` (external data)."""
    if path.exists():
        return
    import onnx
    from onnx import TensorProto, helper

    d, rng = ONNX_DIM, np.random.default_rng(0)
    per_block = (2 * d * 4 * d + 4 * d + d + 2 * d) * 4
    blocks = max(1, round(mb * 1e6 / per_block))
    data_name = path.name + ".data"
    inits, nodes, offset = [], [], 0
    with open(path.parent / data_name, "wb") as f:

        def tensor(name: str, shape: tuple[int, ...]) -> str:
            nonlocal offset
            values = rng.standard_normal(shape, dtype=np.float32) * 0.02
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape,
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data_name), ("offset", str(offset)),
                         ("length", str(values.nbytes))):
                t.external_data.add(key=k, value=v)
            f.write(values.tobytes())
            offset += values.nbytes
            pad = -offset % 4096  # page-aligned, as onnx's writer recommends
            f.write(b"\0" * pad)
            offset += pad
            inits.append(t)
            return name

        x = "x"
        for i in range(blocks):
            up = tensor(f"onnx::MatMul_{i}", (d, 4 * d))  # [in, out]
            nodes.append(helper.make_node("MatMul", [x, up], [f"u{i}"],
                                          name=f"/layers.{i}/mlp/up/MatMul"))
            nodes.append(helper.make_node("Add", [f"u{i}", tensor(f"layers.{i}.mlp.up.bias",
                                                                  (4 * d,))], [f"a{i}"]))
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"]))
            down = tensor(f"layers.{i}.mlp.down.weight", (d, 4 * d))  # [out, in]
            bias = tensor(f"layers.{i}.mlp.down.bias", (d,))
            nodes.append(helper.make_node("Gemm", [f"r{i}", down, bias], [f"g{i}"], transB=1))
            scale = tensor(f"layers.{i}.norm.weight", (d,))
            shift = tensor(f"layers.{i}.norm.bias", (d,))
            nodes.append(helper.make_node("LayerNormalization", [f"g{i}", scale, shift],
                                          [f"n{i}"]))
            x = f"n{i}"
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", 1, [1, d])],
                              [helper.make_tensor_value_info(x, 1, [1, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    tmp = path.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    tmp.rename(path)


def time_onnx_load(path: Path) -> float:
    """The baseline: onnx.load (external data read in) and every initializer as NumPy."""
    import onnx
    from onnx import numpy_helper

    t = time.perf_counter()
    model = onnx.load(str(path))
    arrays = [numpy_helper.to_array(init) for init in model.graph.initializer]
    elapsed = time.perf_counter() - t
    del arrays, model
    return elapsed


def time_onnx_adapter(path: Path) -> float:
    """The adapter alone: read and check the model, then read every record as the store
    does (its names and shapes once, then its values in canonical C order, block by
    block, transposed weights copied in tiles), each hashed so every byte is touched; no
    statistics, no writing."""
    import xxhash

    from weightatlas.adapters import onnx as onnx_adapter
    from weightatlas.storage._blocks import c_blocks

    t = time.perf_counter()
    source = onnx_adapter.read(path)
    scratch = np.empty(8 << 20, np.uint8)
    shapes = [rec.data.shape for rec in source.records()]
    for rec in source.records():
        h = xxhash.xxh3_128()
        for _, block in c_blocks(rec.data, scratch=scratch):
            h.update(block.view(np.uint8).data)
        h.hexdigest()
    source.close()
    assert shapes
    return time.perf_counter() - t


_RSS_ONNX_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[4])
import numpy as np, onnx, weightatlas as wa, weightatlas.adapters.onnx
from onnx import numpy_helper
""" + _RSS_SAMPLER + r"""
if sys.argv[1] == "ingest":
    wa.ingest(sys.argv[2], store=sys.argv[3], model="rss").close()
else:
    model = onnx.load(sys.argv[2])
    arrays = [numpy_helper.to_array(i) for i in model.graph.initializer]
elapsed = time.perf_counter() - start
done.set(); t.join()
print(base, peak[0], elapsed)
"""


def bench_onnx(path: Path, work: Path, repeats: int) -> dict:
    data = path.parent / (path.name + ".data")
    size = path.stat().st_size + data.stat().st_size
    raw = data.read_bytes()  # for (b); also warms the page cache
    a, b, c, d = [], [], [], []
    store_dir = work / "onnx_store"
    for _ in range(repeats):  # interleaved
        a.append(time_onnx_load(path))
        b.append(time_write_bytes(raw, work / "copy.bin"))
        c.append(time_ingest(path, store_dir))
        d.append(time_onnx_adapter(path))
    del raw
    ma, mb, mc, md = (statistics.median(x) for x in (a, b, c, d))
    snap = wa.open_store(store_dir, create=False).snapshot("bench")
    n_tensors, largest = len(snap), max(snap.info(n).nbytes for n in snap.names)
    snap.close()
    shutil.rmtree(store_dir)
    rss = {}
    for mode in ("ingest", "onnx.load"):
        rss_store = work / "onnx_rss_store"
        shutil.rmtree(rss_store, ignore_errors=True)
        out = subprocess.run([sys.executable, "-c", _RSS_ONNX_CHILD, mode, str(path),
                              str(rss_store), str(ROOT)], capture_output=True, text=True,
                             check=True)
        base, peak, _ = out.stdout.split()
        rss[mode] = (int(peak) - int(base)) / 1e6
        shutil.rmtree(rss_store, ignore_errors=True)
    return {"file": path.name, "bytes": size, "tensors": n_tensors, "workdir": str(work),
            "largest_tensor_MB": largest / 1e6, "a_onnx_load_to_array_s": ma,
            "b_write_bytes_s": mb, "c_ingest_s": mc, "d_adapter_read_s": md,
            "ratio_c_over_a": mc / ma, "ratio_d_over_a": md / ma,
            "ratio_c_over_a_plus_b": mc / (ma + mb), "ingest_GB_per_s": size / mc / 1e9,
            "ingest_peak_rss_above_baseline_MB": rss["ingest"],
            "onnx_load_peak_rss_above_baseline_MB": rss["onnx.load"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--rss-gb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_data")
    parser.add_argument("--only", choices=("all", "safetensors", "onnx"), default="all")
    parser.add_argument("--onnx-mb", type=float, default=600.0)
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    load_before = os.getloadavg()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}")
    results = {"machine": machine(), "files": [], "rss": None, "onnx": None,
               "load_average_before": load_before}
    if args.only in ("all", "onnx"):
        path = work / f"bench-{args.onnx_mb:g}mb.onnx"
        generate_onnx(path, args.onnx_mb)
        r = bench_onnx(path, work, args.repeats)
        results["onnx"] = r
        print(f"\n{r['file']} (+ external data): {r['bytes'] / 1e9:.2f} GB, {r['tensors']} "
              f"tensors, largest {r['largest_tensor_MB']:.0f} MB")
        print(f"  (a) onnx.load + to_array {r['a_onnx_load_to_array_s']:.3f} s")
        print(f"  (b) write bytes+fsync    {r['b_write_bytes_s']:.3f} s")
        print(f"  (c) weightatlas ingest   {r['c_ingest_s']:.3f} s  "
              f"({r['ingest_GB_per_s']:.2f} GB/s)")
        print(f"  (d) the adapter alone    {r['d_adapter_read_s']:.3f} s  (read, then every "
              "record's values once in C order, no statistics, no writing)")
        print(f"  c / a = {r['ratio_c_over_a']:.2f}   (target <= 1.5); c / (a + b) = "
              f"{r['ratio_c_over_a_plus_b']:.2f} (ingest also writes and fsyncs the snapshot); "
              f"d / a = {r['ratio_d_over_a']:.2f}")
        print(f"  peak RSS above baseline: ingest {r['ingest_peak_rss_above_baseline_MB']:.0f} MB, "
              f"onnx.load {r['onnx_load_peak_rss_above_baseline_MB']:.0f} MB")
    if args.only == "onnx":
        results["load_average_after"] = os.getloadavg()
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        (work / "ingest-results.json").write_text(json.dumps(results, indent=2))
        return
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
    results["load_average_after"] = os.getloadavg()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    (work / "ingest-results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
