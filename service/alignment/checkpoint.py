"""Versioned checkpoints of an alignment model on disk or as bytes (the I/O kept out of the model).

The bytes form (:func:`checkpoint_bytes`) is what the models topic carries. A checkpoint
directory holds ``model-v{version:06d}.pt`` (metadata + ``state_dict``), a
``model-v{version:06d}.json`` copy of the metadata, and ``LATEST`` naming the newest stem. Writes
go to a temporary name first and are renamed, so a reader never sees a half-written file.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)


def checkpoint_stem(version: int) -> str:
    """``model-v000007`` for version 7."""
    return f"model-v{int(version):06d}"


def save_checkpoint(model: torch.nn.Module, meta: dict[str, Any],
                    directory: str | os.PathLike) -> Path:
    """Write ``model``'s state with ``meta`` (must hold ``version``) and point ``LATEST`` at it.

    Returns the path of the ``.pt`` file written.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    stem = checkpoint_stem(meta["version"])
    tmp = d / f".{stem}.pt.tmp"
    torch.save({"meta": meta, "state": model.state_dict()}, tmp)
    os.replace(tmp, d / f"{stem}.pt")
    (d / f"{stem}.json").write_text(json.dumps(meta, indent=2))
    tmp_latest = d / ".LATEST.tmp"
    tmp_latest.write_text(stem + "\n")
    os.replace(tmp_latest, d / "LATEST")
    return d / f"{stem}.pt"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself, or the ``LATEST`` checkpoint file when ``path`` is a directory."""
    p = Path(path)
    if p.is_dir():
        latest = p / "LATEST"
        if not latest.exists():
            raise ValueError(f"no LATEST checkpoint in {p}")
        p = p / (latest.read_text().strip() + ".pt")
    return p


def load_checkpoint(path: str | os.PathLike, build: Callable[[dict[str, Any]], M]) -> M:
    """Load a checkpoint file (or a directory's ``LATEST``) into ``build(meta)``'s model.

    ``build`` makes an empty model from the metadata; its ``state_dict`` is then loaded.
    Returns that model in eval mode.
    """
    blob = torch.load(resolve_checkpoint(path), map_location="cpu", weights_only=True)
    model = build(blob["meta"])
    model.load_state_dict(blob["state"])
    return model.eval()


def checkpoint_bytes(model: torch.nn.Module, meta: dict[str, Any]) -> bytes:
    """``model``'s state with ``meta`` as bytes (the file format of :func:`save_checkpoint`)."""
    buf = io.BytesIO()
    torch.save({"meta": meta, "state": model.state_dict()}, buf)
    return buf.getvalue()


def load_checkpoint_bytes(blob: bytes, build: Callable[[dict[str, Any]], M]) -> M:
    """Inverse of :func:`checkpoint_bytes` (``weights_only``: no code runs while loading).

    Raises
    ------
    ValueError
        The bytes are not a checkpoint (the message says what went wrong).
    """
    try:
        got = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        model = build(got["meta"])
        model.load_state_dict(got["state"])
    except Exception as exc:
        raise ValueError(f"not a model checkpoint ({len(blob)} bytes): {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return model.eval()
