"""Re-store a committed real dataset with fewer PCA axes and/or int8, without re-encoding.

Usage::

    python scripts/recompact_dataset.py NAME DIMS STORAGE
    python scripts/recompact_dataset.py bible-en-es-full 80 int8

PCA axes are nested (the leading k axes of a PCA-128 are the PCA-k), so keeping the first DIMS
stored axes equals a fresh ``pairsieve datasets build`` with ``dims=DIMS`` up to the float16
rounding of the stored file, which is far below the int8 step. Used once for
``bible-en-es-full`` (float16 PCA-128, 14.5 MB, over the repository's 5 MiB file limit; the
builder now writes PCA-80 int8 itself). Rewrites ``NAME.npz`` and the storage lines and
retrieval-check column of ``NAME.md``; everything else in the ``.md`` (sources, filters, the
full-encoder probe) is kept, and the variance shares are scaled by the kept share.
"""

from __future__ import annotations

import re
import sys

import numpy as np

from service.evaluation.datasets import DATA_DIR
from service.evaluation.real_build import _ridge_probe, stored_arrays


def main(name: str, dims: int, storage: str) -> None:
    path, md = DATA_DIR / f"{name}.npz", DATA_DIR / f"{name}.md"
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    if "a_scale" in data:
        raise SystemExit(f"{path} is already quantised; rebuild it with make datasets")
    old = {k: data[k].astype(np.float64) for k in ("a", "b")}
    if dims > min(v.shape[1] for v in old.values()):
        raise SystemExit(f"{path} has {old['a'].shape[1]} axes; cannot keep {dims}")
    share = {k: float(v[:, :dims].var(axis=0).sum() / v.var(axis=0).sum()) for k, v in old.items()}
    views = stored_arrays(old["a"][:, :dims].astype(np.float16),
                          old["b"][:, :dims].astype(np.float16), storage)
    rest = {k: v for k, v in data.items() if k not in ("a", "b")}
    np.savez_compressed(path, **views, **rest)
    back = {k: views[k].astype(np.float32) * views.get(f"{k}_scale", 1.0) for k in ("a", "b")}
    probe = _ridge_probe(back["a"], back["b"])

    text = md.read_text()

    def rows(m: re.Match) -> str:
        # groups: 1 modality a, 2 its dims, 3 its variance %, 4 modality b, 5 its dims,
        # 6 the stored PCA dims, 7 b's variance %
        how = "float16" if storage == "float16" else "int8 with a float32 scale per axis"
        return (f"view a `{m[1]}` {m[2]}-d -> PCA {dims} ({float(m[3]) * share['a']:.1f}% of "
                f"variance), view b `{m[4]}` {m[5]}-d -> PCA {dims} "
                f"({float(m[7]) * share['b']:.1f}%); stored as {how} (the leading {dims} axes "
                f"of the PCA-{m[6]} build)")

    text = re.sub(r"view a `(\w+)` (\d+)-d -> PCA \d+ \(([\d.]+)% of variance\), view b `(\w+)` "
                  r"(\d+)-d -> PCA (\d+) \(([\d.]+)%\); stored as float16", rows, text)
    keys = "a, b, " + ("a_scale, b_scale, " if storage == "int8" else "")
    text = re.sub(r"- file: `[^`]+`, [\d.]+ MB; keys a, b, ",
                  f"- file: `{path.name}`, {path.stat().st_size / 1e6:.1f} MB; keys {keys}", text)
    text = text.replace("| stored (PCA, float16) |", f"| stored (PCA {dims}, {storage}) |")
    for m_pairs, r1 in ((k[3:], v) for k, v in probe.items()):
        text = re.sub(rf"^\| {m_pairs} \| ([\d.]+) \| [\d.]+ \|$",
                      rf"| {m_pairs} | \g<1> | {r1:.3f} |", text, flags=re.M)
    md.write_text(text)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB); probe {probe}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
