"""Wheels for running tilewise's benchmarks and GPU tests on a machine with no package index.

    python bench/offline_wheels.py --dest .whl            # Python 3.12, manylinux x86_64
    python bench/offline_wheels.py --dest .whl --python 3.11 --include-present

A GPU machine that cannot reach PyPI but has Python, torch (with CUDA) and the usual scientific
stack already (numpy, scipy, scikit-image, pandas, pyarrow, fsspec, psutil, safetensors, pytest,
hypothesis...) needs only what tilewise adds: Ray, Zarr, pydantic, dask, MONAI and their own
needs. This script downloads those wheels, at the versions installed here, for the target's
Python and platform, so they can be copied over and installed with

    python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=$PWD/src:/tmp/site

Ray's wheel (79 MB) carries a 32 MB Java jar (``ray/jars/ray_dist.jar``, for Java workers) and a
JavaScript source map for its dashboard; both are stripped (with their RECORD lines), which keeps
the whole set under 64 MiB for transfers with that limit. Nothing of Python Ray uses is removed.
The script prints every wheel's size and the total.
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

# What tilewise, bench/compare.py and the GPU tests import beyond a PyTorch image's stack:
# Ray (core + Data + Train, without the dashboard's extras), Zarr 3, pydantic 2, dask, MONAI,
# and the packages those need that such an image lacks.
NEEDED = (
    "ray",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "tensorboardX",
    "zarr",
    "numcodecs",
    "donfig",
    "google-crc32c",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "dask",
    "partd",
    "locket",
    "monai",
)
# Needed too, but usually in a PyTorch image already (added with --include-present).
USUALLY_PRESENT = ("toolz", "cloudpickle", "msgpack", "protobuf", "click", "filelock", "pyyaml")
# Members of Ray's wheel that Python Ray never reads.
RAY_STRIP = ("ray/jars/", ".js.map")
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def download(names: list[str], dest: Path, python: str) -> None:
    """``pip download`` each ``name==<version installed here>`` as a binary wheel."""
    pins = [f"{n}=={version(n)}" for n in names]
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
        *platform_args, "--dest", str(dest), *pins,
    ]  # fmt: skip
    subprocess.run(cmd, check=True)


def strip_wheel(path: Path, patterns: tuple[str, ...]) -> int:
    """Rewrite the wheel without the members matching ``patterns`` (and their RECORD lines);
    return the bytes saved."""
    before = path.stat().st_size
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:

        def dropped(name: str) -> bool:
            return any(p in name for p in patterns)

        for info in src.infolist():
            if dropped(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                rows = csv.reader(io.StringIO(data.decode()))
                out = io.StringIO()
                csv.writer(out, lineterminator="\n").writerows(
                    r for r in rows if r and not dropped(r[0])
                )
                data = out.getvalue().encode()
            dst.writestr(info, data)
    tmp.replace(path)
    return before - path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dest", default=".whl", help="folder for the wheels (default .whl)")
    p.add_argument("--python", default="3.12", help="the target's Python version (default 3.12)")
    p.add_argument(
        "--include-present",
        action="store_true",
        help=f"also fetch what a PyTorch image usually has: {', '.join(USUALLY_PRESENT)}",
    )
    args = p.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = list(NEEDED) + (list(USUALLY_PRESENT) if args.include_present else [])
    download(names, dest, args.python)
    for ray_wheel in dest.glob("ray-*.whl"):
        saved = strip_wheel(ray_wheel, RAY_STRIP)
        print(f"stripped {ray_wheel.name}: {saved / 2**20:.1f} MiB less (Java jar, source maps)")
    total = 0
    for wheel in sorted(dest.glob("*.whl")):
        size = wheel.stat().st_size
        total += size
        print(f"{size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:7.2f} MiB  in all, {len(list(dest.glob('*.whl')))} wheels in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
