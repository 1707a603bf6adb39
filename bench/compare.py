"""Compare benchmark: aligning and differencing two snapshots of a >= 100 M parameter model.

Side by side in one run, on two snapshots of a transformer-shaped model (108 M float32
parameters: a 32000 x 1024 embedding, 6 layers of 1024-wide attention and 4096-wide
MLP), written once into a store under ``--workdir``:

  (a) read both snapshots' bytes: ``Snapshot.read`` of every tensor (checksum verified),
  (b) ``weightatlas.core.compare.compare`` of the two: alignment and every difference.

Two second snapshots are used: ``noise`` (every tensor changed by 0.1 % noise: the
"real change" path) and ``bf16`` (every tensor rounded to bfloat16 and back: the
cast-detection path, which checks every piece). Target (issue 4): b / a <= 2, and
the anonymous memory (``RssAnon``) that compare adds stays below the largest tensor.
Timings are medians of interleaved repeats (read, compare, read, compare...), files
in the page cache, or with ``--cold`` read from the disk (the snapshot files evicted
from the page cache before each run). CPU time (all threads) and the alignment alone
(no tensor bytes) are measured too, and the load average is printed before and after:
on a shared machine, compare's worker threads compete for the cores.

    python bench/compare.py [--repeats 5] [--cold] [--workdir bench/_data/compare]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import machine  # noqa: E402
from weightatlas.core.compare import align, compare  # noqa: E402
from weightatlas.storage import RecordsSource, Store, TensorRecord  # noqa: E402

DIM, FF, LAYERS, VOCAB = 1024, 4096, 6, 32000


def shapes() -> list[tuple[str, tuple[int, ...]]]:
    out = [("embed.weight", (VOCAB, DIM))]
    for i in range(LAYERS):
        p = f"layers.{i}."
        out += [(p + f"attn.{x}_proj.weight", (DIM, DIM)) for x in "qkvo"]
        out += [(p + "mlp.fc1.weight", (FF, DIM)), (p + "mlp.fc1.bias", (FF,)),
                (p + "mlp.fc2.weight", (DIM, FF)), (p + "norm.weight", (DIM,))]
    return out


def build(store: Store) -> None:
    if store.snapshots("big"):
        return
    rng = np.random.default_rng(0)
    base = {n: rng.standard_normal(s, dtype=np.float32) * 0.02 for n, s in shapes()}
    store.write(RecordsSource([TensorRecord(n, a) for n, a in base.items()]), "big", tag="base")
    noisy = {n: a * (1 + 1e-3 * rng.standard_normal(a.shape, dtype=np.float32))
             for n, a in base.items()}
    store.write(RecordsSource([TensorRecord(n, a) for n, a in noisy.items()]), "big",
                tag="noise")
    del noisy
    cast = {n: a.astype(ml_dtypes.bfloat16).astype(np.float32) for n, a in base.items()}
    store.write(RecordsSource([TensorRecord(n, a) for n, a in cast.items()]), "big", tag="bf16")


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class Peak:
    """Samples RssAnon every 2 ms on a thread; ``peak - start`` is what the work added."""

    def __enter__(self) -> Peak:
        self.start = rss_anon()
        self.peak = self.start
        self.done = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def run(self) -> None:
        while not self.done:
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self.done = True
        self.thread.join()
        self.peak = max(self.peak, rss_anon())


def evict(store: Store) -> None:
    """Drop the snapshot files' pages from the page cache, so that reads come from the disk.

    ``posix_fadvise(DONTNEED)`` on this store's files only: no root needed, and other
    programs' cached files stay cached. Snapshots must be closed (their maps released).
    """
    gc.collect()  # release the memory maps of closed snapshots
    for path in Path(store.root).rglob("*.arrow"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_both(store: Store, other: str) -> tuple[float, float]:
    """Wall and CPU seconds to read both snapshots' tensors (checksums verified)."""
    started, cpu = time.perf_counter(), time.process_time()
    for tag in ("base", other):
        snap = store.snapshot(f"big@{tag}")
        for name in snap.names:
            snap.read(name)  # zero-copy view, every byte checksummed (touched once)
        snap.close()
    return time.perf_counter() - started, time.process_time() - cpu


def run_compare(store: Store, other: str, sample: bool = False
                ) -> tuple[float, float, int, str]:
    """Wall and CPU seconds of compare, the anonymous memory it added (with ``sample``,
    from a thread reading /proc every 2 ms, so timed runs go without it), verdicts."""
    a, b = store.snapshot("big@base"), store.snapshot(f"big@{other}")
    with Peak() if sample else contextlib.nullcontext() as peak:
        started, cpu = time.perf_counter(), time.process_time()
        result = compare(a, b)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    verdicts = sorted(set(result.pairs.column("verdict").to_pylist()))
    assert result.complete, result.summary()
    a.close()
    b.close()
    added = peak.peak - peak.start if isinstance(peak, Peak) else 0
    return seconds, cpu, added, ",".join(verdicts)


def run_align(store: Store, other: str) -> float:
    a, b = store.snapshot("big@base"), store.snapshot(f"big@{other}")
    started = time.perf_counter()
    align(a, b)
    seconds = time.perf_counter() - started
    a.close()
    b.close()
    return seconds


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "_data" / "compare"))
    parser.add_argument("--cold", action="store_true",
                        help="Evict the snapshot files from the page cache before each run.")
    args = parser.parse_args()
    store = Store(args.workdir, create=True)
    build(store)
    n_params = sum(int(np.prod(s)) for _, s in shapes())
    largest = max(int(np.prod(s)) for _, s in shapes()) * 4
    print(f"machine: {machine()}")
    print(f"model: {n_params / 1e6:.1f} M float32 parameters, {len(shapes())} tensors, "
          f"largest {largest / 2**20:.0f} MiB")
    print(f"before: {load()}")
    results: dict[str, object] = {"load_before": os.getloadavg()}
    for other in ("noise", "bf16"):
        reads, compares, aligns, ratios, cpu_reads, cpu_compares = [], [], [], [], [], []
        verdicts = ""
        for _ in range(args.repeats):
            if args.cold:
                evict(store)
            wall, cpu = read_both(store, other)
            reads.append(wall)
            cpu_reads.append(cpu)
            if args.cold:
                evict(store)
            wall, cpu, _, verdicts = run_compare(store, other)
            compares.append(wall)
            cpu_compares.append(cpu)
            ratios.append(wall / reads[-1])
            aligns.append(run_align(store, other))
        if args.cold:
            evict(store)
        peak = run_compare(store, other, sample=True)[2]
        r, c = statistics.median(reads), statistics.median(compares)
        cr, cc = statistics.median(cpu_reads), statistics.median(cpu_compares)
        results[other] = {"read_both_s": r, "compare_s": c, "ratio": c / r,
                          "ratio_of_pairs_median": statistics.median(ratios),
                          "read_both_cpu_s": cr, "compare_cpu_s": cc, "cpu_ratio": cc / cr,
                          "align_s": statistics.median(aligns),
                          "compare_peak_anon_mib": peak / 2**20,
                          "largest_tensor_mib": largest / 2**20, "verdicts": verdicts}
        print(f"{other:>5}: read both {r:.3f} s, compare {c:.3f} s (alignment alone "
              f"{statistics.median(aligns) * 1e3:.0f} ms), ratio {c / r:.2f} (target <= 2; "
              f"median of per-repeat ratios {statistics.median(ratios):.2f}); CPU time "
              f"{cr:.3f} s and {cc:.3f} s (all threads), ratio {cc / cr:.2f}; compare added "
              f"{peak / 2**20:.0f} MiB anonymous memory (largest tensor "
              f"{largest / 2**20:.0f} MiB); verdicts {verdicts}")
    print(f"after: {load()}")
    results["load_after"] = os.getloadavg()
    out = Path(args.workdir).parent / f"compare-results{'-cold' if args.cold else ''}.json"
    out.write_text(json.dumps({"machine": machine(), "n_params": n_params, **results},
                              indent=2))


if __name__ == "__main__":
    main()
