"""Child process for crash and concurrency tests: write snapshots into a store.

usage: python _writer_child.py STORE MODEL STEP SEED MB [--pause-after-write-bytes N]
                               [--go-file PATH]
Prints READY once it has written N bytes of rows, then sleeps (to be killed).
Exit status 0: committed; 3: SnapshotExistsError; 1: anything else.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from weightatlas.errors import SnapshotExistsError
from weightatlas.storage import RecordsSource, Store, TensorRecord


def main() -> int:
    root, model, step, seed, mb = sys.argv[1:6]
    args = sys.argv[6:]
    pause_at = int(args[args.index("--pause-after-write-bytes") + 1]) if (
        "--pause-after-write-bytes" in args) else None
    go = args[args.index("--go-file") + 1] if "--go-file" in args else None
    rng = np.random.default_rng(int(seed))
    n = int(float(mb) * 1024 * 1024 / 4 / 8)
    records = [TensorRecord(f"layer{i}.weight", rng.standard_normal(n).astype(np.float32))
               for i in range(8)]
    written = 0

    def progress(phase: str, nbytes: int, total: int) -> None:
        nonlocal written
        if phase == "write":
            written += nbytes
            if pause_at is not None and written >= pause_at:
                print("READY", flush=True)
                time.sleep(3600)

    store = Store(root, create=True)
    if go:
        while not os.path.exists(go):
            time.sleep(0.001)
    try:
        store.write(RecordsSource(records), model, step=int(step), progress=progress,
                    chunk_bytes=1 << 20)
    except SnapshotExistsError as e:
        print(f"EXISTS {e}", flush=True)
        return 3
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
