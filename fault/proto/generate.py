"""Generate the health stubs from health.proto with grpcio-tools.

    python -m suanli.fault.proto.generate [OUT_DIR]     # default: next to this file

The .proto is compiled under the include path `suanli/fault/proto/`, so the descriptor is
registered as "suanli/fault/proto/health.proto" (no clash with another library's
"health.proto" in the process-wide descriptor pool); the grpc stub's import is then made
package-relative so the files work wherever the package lives.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "health.proto"
OUTPUTS = ("health_pb2.py", "health_pb2.pyi", "health_pb2_grpc.py")
_PKG = "suanli/fault/proto"


def generate(out_dir: Path | str = HERE) -> list[Path]:
    """Compile health.proto into out_dir; returns the written files."""
    from grpc_tools import protoc
    import grpc_tools

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        src_root, gen_root = Path(tmp) / "src", Path(tmp) / "gen"
        (src_root / _PKG).mkdir(parents=True)
        gen_root.mkdir()
        shutil.copyfile(PROTO, src_root / _PKG / "health.proto")
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        rc = protoc.main(["grpc_tools.protoc", f"-I{src_root}", f"-I{well_known}",
                          f"--python_out={gen_root}", f"--pyi_out={gen_root}",
                          f"--grpc_python_out={gen_root}", f"{_PKG}/health.proto"])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {PROTO} (exit {rc}); fix the .proto and rerun")
        written = []
        for name in OUTPUTS:
            text = (gen_root / _PKG / name).read_text()
            # protoc writes an absolute import of the package path; make it relative.
            text = re.sub(r"^from suanli\.fault\.proto import health_pb2 as (\w+)$",
                          r"from . import health_pb2 as \1", text, flags=re.M)
            (out_dir / name).write_text(text)
            written.append(out_dir / name)
    return written


if __name__ == "__main__":
    for p in generate(sys.argv[1] if len(sys.argv) > 1 else HERE):
        print(p)
