"""The ``tilewise`` command: run | validate | schema | models | demo.

User mistakes (:class:`~tilewise.errors.TilewiseError`) print as one clear line per problem and
exit with status 2; they never show a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from tilewise.errors import TilewiseError

__all__ = ["main"]


def _cmd_run(args: argparse.Namespace) -> int:
    from tilewise.pipeline.driver import run_job
    from tilewise.spec import load_job

    job = load_job(args.job)
    report = run_job(
        job,
        address=args.address,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print("\n".join(report.lines()))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from tilewise.spec import validate_files

    failed = 0
    for path, errors in validate_files(args.jobs).items():
        if errors:
            failed += 1
            for line in errors:
                print(line, file=sys.stderr)
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from tilewise.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from tilewise import models

    names = [models.entry(args.name).name] if args.name else models.names()
    header = f"{'name':<12} {'params':>12} {'stride':>6} {'size rule':>14} {'halo':>6}  exact"
    print(header)
    for name in names:
        e = models.entry(name)
        import torch

        with torch.device("meta"):
            model = models.create(name, in_channels=3, num_classes=2)
        f: models.TilingFacts = model.tiling  # type: ignore[assignment]
        params = sum(p.numel() for p in model.parameters())
        rule = f"{f.size_rule.minimum}+{f.size_rule.step}k"
        halo = "-" if f.halo is None else str(f.halo)
        print(
            f"{name:<12} {params:>12,} {f.stride:>6} {rule:>14} {halo:>6}  "
            f"{'yes' if f.exact else 'no'}   {e.summary}"
        )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from tilewise.demo import run_demo

    run_demo(workdir=args.workdir, size=args.size, progress=not args.no_progress)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tilewise",
        description="Seamless overlap-tile segmentation of huge images with Ray, Zarr and PyTorch.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job spec (resumes an interrupted run)")
    run.add_argument("job", help="YAML job spec")
    run.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or embedded)")
    run.add_argument("--workers", type=int, help="predictor actors (default: one per GPU, or 1)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.set_defaults(func=_cmd_run)

    val = sub.add_parser("validate", help="check job specs; report every problem of every file")
    val.add_argument("jobs", nargs="+", help="YAML job specs")
    val.set_defaults(func=_cmd_validate)

    sch = sub.add_parser("schema", help="print the JSON schema of job specs (for editors)")
    sch.set_defaults(func=_cmd_schema)

    mod = sub.add_parser("models", help="list the architectures and their tiling facts")
    mod.add_argument("name", nargs="?", help="one architecture")
    mod.set_defaults(func=_cmd_models)

    demo = sub.add_parser("demo", help="build a mosaic from a real IHC slide and segment it")
    demo.add_argument("--workdir", default="tilewise-demo", help="folder for data and results")
    demo.add_argument("--size", type=int, default=4096, help="mosaic side in pixels")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tilewise`` console script."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except TilewiseError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
