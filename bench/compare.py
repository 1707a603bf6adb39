"""Compare benchmark: aligning and differencing two snapshots of a >= 100 M parameter model.

Side by side in one run, on two snapshots of a transformer-shaped model (108 M float32
parameters: a 32000 x 1024 embedding, 6 layers of 1024-wide attention and 4096-wide
MLP), written once into a store under ``--workdir``:

  (a) read both snapshots' bytes: ``Snapshot.read`` of every tensor (checksum verified),
  (b) ``weightatlas.core.compare.compare`` of the two: alignment and every difference.

Two second snapshots are used: ``noise`` (every tensor changed by 0.1 % noise: the
"real change" path) and ``bf16`` (every tensor rounded to bfloat16 and back: the
cast-detection path, which checks every block). Target (issue 4): b / a <= 2, and
the anonymous memory (``RssAnon``) that compare adds stays below the largest tensor.
Timings are medians of interleaved repeats, files in the page cache, or with
``--cold`` read from the disk (the page cache dropped before each run; needs root).

    python bench/compare.py [--repeats 3] [--cold] [--workdir bench/_data/compare]
"""

from __future__ import annotations

import argparse
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
from weightatlas.core.compare import compare  # noqa: E402
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


def drop_caches() -> bool:
    """Evict the page cache (root only), so that reads come from the disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError:
        return False
    return True


def read_both(store: Store, other: str) -> float:
    started = time.perf_counter()
    for tag in ("base", other):
        snap = store.snapshot(f"big@{tag}")
        for name in snap.names:
            snap.read(name)  # zero-copy view, every byte checksummed (touched once)
        snap.close()
    return time.perf_counter() - started


def run_compare(store: Store, other: str) -> tuple[float, int, str]:
    a, b = store.snapshot("big@base"), store.snapshot(f"big@{other}")
    with Peak() as peak:
        started = time.perf_counter()
        result = compare(a, b)
        seconds = time.perf_counter() - started
    verdicts = sorted(set(result.pairs.column("verdict").to_pylist()))
    assert result.complete, result.summary()
    a.close()
    b.close()
    return seconds, peak.peak - peak.start, ",".join(verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "_data" / "compare"))
    parser.add_argument("--cold", action="store_true",
                        help="Drop the page cache before each timed run (needs root).")
    args = parser.parse_args()
    store = Store(args.workdir, create=True)
    build(store)
    n_params = sum(int(np.prod(s)) for _, s in shapes())
    largest = max(int(np.prod(s)) for _, s in shapes()) * 4
    print(f"machine: {machine()}")
    print(f"model: {n_params / 1e6:.1f} M float32 parameters, {len(shapes())} tensors, "
          f"largest {largest / 2**20:.0f} MiB")
    results = {}
    for other in ("noise", "bf16"):
        reads, compares, peaks = [], [], []
        verdicts = ""
        for _ in range(args.repeats):
            if args.cold and not drop_caches():
                raise SystemExit("--cold needs permission to write /proc/sys/vm/drop_caches")
            reads.append(read_both(store, other))
            if args.cold:
                drop_caches()
            seconds, peak, verdicts = run_compare(store, other)
            compares.append(seconds)
            peaks.append(peak)
        r, c = statistics.median(reads), statistics.median(compares)
        results[other] = {"read_both_s": r, "compare_s": c, "ratio": c / r,
                          "compare_peak_anon_mib": max(peaks) / 2**20,
                          "largest_tensor_mib": largest / 2**20, "verdicts": verdicts}
        print(f"{other:>5}: read both {r:.2f} s, compare {c:.2f} s, ratio {c / r:.2f} "
              f"(target <= 2); compare added {max(peaks) / 2**20:.0f} MiB anonymous memory "
              f"(largest tensor {largest / 2**20:.0f} MiB); verdicts {verdicts}")
    out = Path(args.workdir).parent / f"compare-results{'-cold' if args.cold else ''}.json"
    out.write_text(json.dumps({"machine": machine(), "n_params": n_params, **results},
                              indent=2))


if __name__ == "__main__":
    main()
