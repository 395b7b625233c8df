"""The contracts and their generated code: lint-clean, and the committed code matches protos/."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "libs" / "protos"


def _generated_files(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
        and path.suffix in {".py", ".pyi"}
        and "aiprod" == path.relative_to(directory).parts[0]
    }


def test_generated_code_is_up_to_date_with_protos(tmp_path):
    protos = sorted(str(path.relative_to(ROOT / "protos")) for path in (ROOT / "protos").rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", *protos],
        cwd=ROOT / "protos",
        check=True,
    )  # fmt: skip
    fresh, committed = _generated_files(tmp_path), _generated_files(GENERATED)
    assert fresh.keys() == committed.keys(), "run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"generated code is out of date with protos/ ({stale}): run `make protos`"


def test_every_rpc_has_its_own_request_and_response():
    from aiprod.gateway.v1 import gateway_pb2
    from aiprod.metrics.v1 import metrics_pb2
    from aiprod.renderer.v1 import renderer_pb2
    from aiprod.router.v1 import router_pb2

    for module in (gateway_pb2, router_pb2, renderer_pb2, metrics_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert method.input_type.name == f"{method.name}Request"
                assert method.output_type.name == f"{method.name}Response"
