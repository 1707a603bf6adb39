"""Analyses benchmark (issue 6), side by side in one run.

1. Spectral analysis of every weight matrix of a ~20-million-parameter transformer
   (plain torch.nn, random init, fixed seed): ``weightatlas.core.spectrum`` on the
   ingested snapshot against WeightWatcher's ``analyze()`` on the live model, with
   the alphas of the layers both analyse compared. Target: >= 3x faster, same alphas.
2. Projections of a 30,000 x 384 matrix: PCA (target < 1 s) and t-SNE (target < 60 s
   on 2 cores; openTSNE after PCA to 50 dims), with scikit-learn's exact-gradient-free
   Barnes-Hut t-SNE on 5,000 rows for reference.

    python bench/analyses.py [--skip-tsne]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import weightatlas as wa  # noqa: E402
from weightatlas.core import pca, project, spectrum  # noqa: E402


def transformer(vocab: int = 5000, d: int = 512, layers: int = 5, ff: int = 2048):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.head = nn.Linear(d, vocab)

    torch.manual_seed(0)
    return Model()


def bench_spectrum(tmp: Path) -> None:
    import torch
    import weightwatcher as ww
    from safetensors.torch import save_file

    model = transformer()
    n_params = sum(p.numel() for p in model.parameters())
    path = tmp / "transformer.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    snap = wa.ingest(path, store=tmp / "store")
    torch.set_num_threads(2)

    t = time.perf_counter()
    ours = spectrum(snap)
    t_ours = time.perf_counter() - t

    t = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        details = ww.WeightWatcher(model=model).analyze(plot=False, randomize=False)
    t_ww = time.perf_counter() - t

    by_name = {r["name"]: r["alpha"] for r in ours.to_pylist()}
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear | torch.nn.Embedding)]
    pairs = []
    for ww_name, alpha in zip(details["longname"], details["alpha"], strict=True):
        ours_alpha = by_name.get(f"{ww_name}.weight")
        if ours_alpha is not None and ww_name in names:
            pairs.append((ww_name, alpha, ours_alpha))
    diffs = np.array([abs(a - b) for _, a, b in pairs])
    print(f"spectrum of a {n_params / 1e6:.1f} M-parameter transformer "
          f"({ours.num_rows} matrices; WeightWatcher analysed {len(details)} layers)")
    print(f"  weightatlas spectrum  {t_ours:7.2f} s")
    print(f"  WeightWatcher analyze {t_ww:7.2f} s")
    print(f"  speed-up {t_ww / t_ours:.1f}x (target >= 3x); alphas compared on {len(pairs)} "
          f"layers: max |diff| {diffs.max():.2e}, median {np.median(diffs):.2e} (target <= 0.05)")


def bench_projections(skip_tsne: bool) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 384)) * 3
    x = (centres[rng.integers(0, 20, 30_000)] + rng.standard_normal((30_000, 384))).astype(
        np.float32)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        pca(x, 2)
        times.append(time.perf_counter() - t)
    print(f"\nPCA of 30,000 x 384: {np.median(times):.3f} s (median of 5; target < 1 s)")
    if skip_tsne:
        return
    t = time.perf_counter()
    _, facts = project(x, "tsne", n_jobs=2)
    t_ours = time.perf_counter() - t
    print(f"t-SNE of 30,000 x 384 (openTSNE, PCA to 50 dims keeping "
          f"{facts['pca_variance_kept']:.0%} of the variance): {t_ours:.1f} s (target < 60 s)")
    from sklearn.manifold import TSNE

    t = time.perf_counter()
    TSNE(random_state=0, n_jobs=2).fit_transform(x[:5000])
    t_sk = time.perf_counter() - t
    print(f"scikit-learn t-SNE of 5,000 x 384 rows: {t_sk:.1f} s "
          f"({t_sk / t_ours * 6:.1f}x slower per row, 6x fewer rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-tsne", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_spectrum(Path(tmp))
    bench_projections(args.skip_tsne)


if __name__ == "__main__":
    main()
