"""Regenerate the Python modules of the gRPC protos: ``python -m service.grpc.proto.generate``.

Needs grpcio-tools (the ``dev`` extra, pinned so that a fresh generation matches the committed
modules byte for byte; ``tests/service/test_grpc_stubs.py`` checks it). ``make grpc-stubs`` runs it.

One change is made to protoc's output: the messages are registered in a descriptor pool of their
own (``POOL`` in ``pool.py``) instead of protobuf's default pool. Triton's own client,
``tritonclient.grpc``, registers the same ``inference.*`` names in the default pool, and the
default pool refuses a second definition of a name, so without this the service and a Triton
client could not be imported into one process (a test, an embedding application).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the repository root: protos import by full path
PACKAGE = Path("service/grpc/proto")
PROTOS = ("model_config.proto", "grpc_service.proto")
#: what protoc writes that is kept (the model config has no service, so no ``_pb2_grpc``)
OUTPUTS = (
    "model_config_pb2.py",
    "model_config_pb2.pyi",
    "grpc_service_pb2.py",
    "grpc_service_pb2.pyi",
    "grpc_service_pb2_grpc.py",
)
DEFAULT_POOL = "_descriptor_pool.Default()"
OWN_POOL = "_own_pool.POOL"
POOL_IMPORT = "from service.grpc.proto import pool as _own_pool\n"
IMPORTS_END = "# @@protoc_insertion_point(imports)\n"


def generate(out: Path) -> list[Path]:
    """Write the generated modules into ``out`` (a folder); return their paths."""
    from grpc_tools import protoc  # a development dependency, not needed to serve

    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory(prefix="rnnserve-protoc-") as scratch:
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            *(str(PACKAGE / name) for name in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see the messages above")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name in OUTPUTS:
            target = out / name
            shutil.copyfile(Path(scratch) / PACKAGE / name, target)
            if name.endswith("_pb2.py"):
                _use_own_pool(target)
            written.append(target)
    return written


def _use_own_pool(module: Path) -> None:
    """Register the module's messages in ``pool.POOL`` instead of the default pool."""
    text = module.read_text()
    if text.count(DEFAULT_POOL) != 1 or text.count(IMPORTS_END) != 1:
        raise RuntimeError(f"{module.name}: protoc's output changed shape; update {__file__}")
    text = text.replace(DEFAULT_POOL, OWN_POOL).replace(IMPORTS_END, IMPORTS_END + POOL_IMPORT)
    module.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / PACKAGE, help="output folder")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
