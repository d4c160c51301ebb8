"""Generate the protobuf / gRPC Python code for protos/ into service/wire/gen (``make proto``).

Generated files are committed and never edited by hand; tests/unit/test_proto_fresh.py fails
when they are stale. Imports are rewritten to be package-relative, so the code works as
``service.wire.gen.pairsieve.v1`` without putting ``gen`` on ``sys.path``.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
OUT = ROOT / "service" / "wire" / "gen"


def generate(out: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}",
                      f"--pyi_out={out}", f"--grpc_python_out={out}", *files])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    written = []
    for p in sorted(out.rglob("*.py*")):
        text = p.read_text()
        # "from pairsieve.v1 import x_pb2" -> "from . import x_pb2" (same package)
        text = re.sub(r"^from pairsieve\.v1 import (\w+_pb2)", r"from . import \1", text,
                      flags=re.M)
        p.write_text(text)
        written.append(p)
    for d in [out, *[d for d in out.rglob("*") if d.is_dir()]]:
        (d / "__init__.py").touch()
    return written


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        if OUT.exists():
            shutil.rmtree(OUT)
        shutil.copytree(tmp, OUT)
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"generated {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
