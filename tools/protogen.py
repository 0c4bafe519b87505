"""Generate everything that comes from protos/, once, into build/.

- build/gen/python/: Python messages, gRPC stubs and .pyi type stubs, imported
  by services, the adapter and clients (never copied into them);
- build/proto/medmesh.binpb: the descriptor set (imports and source info included)
  that Envoy's grpc_json_transcoder loads and that `buf lint` / `buf breaking` check.

`buf/validate/validate.proto` is taken from the installed protovalidate package
(its embedded descriptor), so the rules the validator enforces and the rules the
protos declare are the same version and no schema registry is needed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import grpc_tools
from google.protobuf import descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2
from grpc_tools import protoc
from protovalidate._gen.buf.validate import validate_pb

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN_PY = ROOT / "build" / "gen" / "python"
PROTO_OUT = ROOT / "build" / "proto"
DESCRIPTOR_SET = PROTO_OUT / "medmesh.binpb"
DEPS_SET = PROTO_OUT / "deps.binpb"
VALIDATE_PROTO = "buf/validate/validate.proto"
# Rich error details: Envoy needs their descriptors to render google.rpc.Status as JSON.
EXTRA_INPUTS = ["google/rpc/status.proto", "google/rpc/error_details.proto"]


def _googleapis_include() -> Path:
    import google.api  # the googleapis-common-protos package ships the .proto sources

    return Path(next(iter(google.api.__path__))).parent.parent


def write_deps_set() -> None:
    deps = descriptor_pb2.FileDescriptorSet()
    for module in (descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2):
        deps.file.add().ParseFromString(module.DESCRIPTOR.serialized_pb)
    deps.file.add().ParseFromString(validate_pb._DESC.proto.to_binary())
    DEPS_SET.write_bytes(deps.SerializeToString())


def run_protoc(args: list[str], protos: Path = PROTOS) -> None:
    wkt = Path(next(iter(grpc_tools.__path__))) / "_proto"
    code = protoc.main(
        ["protoc", f"-I{protos}", f"-I{_googleapis_include()}", f"-I{wkt}", f"--descriptor_set_in={DEPS_SET}", *args]
    )
    if code != 0:
        sys.exit(f"protoc failed ({code}) for {args[-3:]}")


def build_descriptor_set(protos: Path, out: Path) -> list[str]:
    """Compiles every .proto under `protos` into the descriptor set `out`; returns their paths."""
    sources = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))
    out.parent.mkdir(parents=True, exist_ok=True)
    PROTO_OUT.mkdir(parents=True, exist_ok=True)
    write_deps_set()
    descriptor_args = ["--include_imports", "--include_source_info", *sources, *EXTRA_INPUTS]
    run_protoc([f"--descriptor_set_out={out}", *descriptor_args], protos)
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--descriptor-only", action="store_true", help="only build a descriptor set")
    parser.add_argument("--protos", type=Path, default=PROTOS)
    parser.add_argument("--out", type=Path, default=DESCRIPTOR_SET)
    args = parser.parse_args()
    if args.descriptor_only:
        build_descriptor_set(args.protos, args.out)
        return
    if GEN_PY.exists():
        shutil.rmtree(GEN_PY)
    GEN_PY.mkdir(parents=True)
    sources = build_descriptor_set(PROTOS, DESCRIPTOR_SET)
    run_protoc([f"--python_out={GEN_PY}", f"--pyi_out={GEN_PY}", f"--grpc_python_out={GEN_PY}", *sources])
    run_protoc([f"--python_out={GEN_PY}", f"--pyi_out={GEN_PY}", VALIDATE_PROTO])
    # Regular packages, so mypy and importers see plain modules.
    for directory in [GEN_PY / "buf", *(p for p in GEN_PY.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    (GEN_PY / "medmesh" / "__init__.py").unlink()  # medmesh/ at the root owns the package
    print(f"generated {len(sources)} protos -> {GEN_PY.relative_to(ROOT)}, {DESCRIPTOR_SET.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
