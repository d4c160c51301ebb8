"""The committed generated code (service/wire/gen) matches what `make proto` produces now."""

import importlib.util
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_is_fresh():
    gen = _load_generator()
    with tempfile.TemporaryDirectory() as tmp:
        written = gen.generate(Path(tmp))
        assert written, "protoc produced nothing"
        fresh = {p.relative_to(tmp).as_posix(): p.read_text() for p in Path(tmp).rglob("*.py*")}
    committed = {p.relative_to(gen.OUT).as_posix(): p.read_text()
                 for p in gen.OUT.rglob("*.py*") if "__pycache__" not in p.parts}
    stale = sorted(k for k in fresh if committed.get(k) != fresh[k])
    assert not stale, f"generated code is stale, run `make proto`: {stale}"
    assert set(committed) == set(fresh)


def test_generated_imports_are_package_relative():
    text = (ROOT / "service/wire/gen/pairsieve/v1/pairsieve_pb2_grpc.py").read_text()
    assert "from . import pairsieve_pb2" in text
    assert "\nimport pairsieve" not in text and "from pairsieve" not in text
