"""Generate (or check) the committed gRPC stubs for protos/specmesh/v1/*.proto.

    python protos/generate.py          # regenerate *_pb2.py, *_pb2_grpc.py, *_pb2.pyi
    python protos/generate.py --check  # fail if the committed files are stale
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent
PROTO_DIR = ROOT / "specmesh" / "v1"


def _generate_into(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc for every .proto into out_dir; return the generated paths (relative)."""
    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        generated = _generate_into(out)
        committed = sorted(p.relative_to(ROOT) for p in PROTO_DIR.glob("*_pb2*.py*"))
        if args.check:
            stale = [str(p) for p in generated if not (ROOT / p).exists()
                     or not filecmp.cmp(out / p, ROOT / p, shallow=False)]
            extra = [str(p) for p in committed if p not in generated]
            if stale or extra:
                print("stale generated stubs:", *stale, *extra, sep="\n  ")
                print("run: python protos/generate.py")
                return 1
            print(f"{len(generated)} generated files are fresh")
            return 0
        for p in committed:
            (ROOT / p).unlink()
        for p in generated:
            shutil.copyfile(out / p, ROOT / p)
        print(f"wrote {len(generated)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
