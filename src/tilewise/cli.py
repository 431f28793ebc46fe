"""The ``tilewise`` command: run [--plan] | submit | validate | schema | models [--probe] | demo |
ingest | shards | export | preview.

User mistakes (:class:`~tilewise.errors.TilewiseError`) print as one clear line per problem and
exit with status 2; they never show a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from tilewise.errors import TilewiseError

__all__ = ["main"]


def _cmd_run(args: argparse.Namespace) -> int:
    from tilewise.errors import ConfigError
    from tilewise.pipeline.driver import run_job
    from tilewise.spec import TrainJob, load_job

    job = load_job(args.job)
    if isinstance(job, TrainJob):
        from tilewise.training.run import run_training

        if args.plan:
            raise ConfigError(f"--plan is for predict jobs; '{args.job}' is a train job.")
        if args.workers is not None:
            if args.workers < 0:
                raise ConfigError(
                    f"--workers is the number of Ray Train workers of a train job, 0 to train "
                    f"in-process; got {args.workers}."
                )
            scaling = job.scaling.model_copy(update={"workers": args.workers})
            job = job.model_copy(update={"scaling": scaling})
        summary = run_training(
            job,
            address=args.address,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
        print(json.dumps(summary.to_dict()) if args.json else "\n".join(summary.lines()))
        return 0
    if args.plan:
        from tilewise.pipeline.detect import plan_detection
        from tilewise.pipeline.plan import plan_job

        plan: Any = (
            plan_detection(job, address=args.address, workers=args.workers)
            if job.model.instance
            else plan_job(job, address=args.address, workers=args.workers, overwrite=args.overwrite)
        )
        print(json.dumps(plan.to_dict()) if args.json else "\n".join(plan.lines()))
        return 0
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


def _cmd_ingest(args: argparse.Namespace) -> int:
    from tilewise.io.ingest import ingest

    report = ingest(
        args.src,
        args.dst,
        overwrite=args.overwrite,
        chunk=args.chunk,
        levels=args.levels,
        workers=args.workers,
    )
    print(json.dumps(report.to_dict()) if args.json else "\n".join(report.lines()))
    return 0


def _cmd_shards(args: argparse.Namespace) -> int:
    from tilewise.io.cut import cut_shards

    report = cut_shards(
        args.image,
        args.labels,
        args.dest,
        size=args.size,
        chunk=args.chunk,
        kind="instances" if args.instances else "unet" if args.unet_weights else "classes",
        ignore_index=args.ignore_index,
        keep_empty=args.keep_empty,
        name=args.name,
        overwrite=args.overwrite,
        workers=args.workers,
        w0=args.w0,
        sigma=args.sigma,
    )
    print(json.dumps(report.to_dict()) if args.json else "\n".join(report.lines()))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from tilewise.io.export import export

    report = export(
        args.output, args.dst, what=args.what, fmt=args.format, overwrite=args.overwrite
    )
    print(json.dumps(report.to_dict()) if args.json else "\n".join(report.lines()))
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from tilewise.io import score as scoring

    scoring.check_settings(args.ignore_index, args.workers, args.instances)
    report: Any
    if args.output.lower().endswith((".yaml", ".yml")):
        report = scoring.score_job(
            args.output,
            args.labels,
            ignore_index=args.ignore_index,
            workers=args.workers,
            instances=args.instances,
        )
    elif args.instances:
        report = scoring.score_instances(args.output, args.labels, workers=args.workers)
    else:
        report = scoring.score(
            args.output, args.labels, ignore_index=args.ignore_index, workers=args.workers
        )
    print(json.dumps(report.to_dict()) if args.json else "\n".join(report.lines()))
    return 0


def _level_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"the level is a number (0 = full resolution) or 'auto', not '{value}'"
        ) from None


def _cmd_preview(args: argparse.Namespace) -> int:
    from tilewise.pipeline.preview import write_preview

    info = write_preview(args.output, args.png, level=args.level, max_size=args.max_size)
    h, w = info.shape
    print(f"preview of level {info.level} ({h} x {w} px): {info.path}")
    if not info.complete:
        print(
            f"warning: '{args.output}' is not complete (its run has not finished): what is not "
            f"written yet shows as class 0. Run the job again to finish it.",
            file=sys.stderr,
        )
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


def _arch_args(pairs: Sequence[str]) -> dict[str, object]:
    """``--arg key=value`` pairs; values are read as YAML (numbers, lists, true/false)."""
    import yaml

    from tilewise.errors import ConfigError

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--arg takes key=value (e.g. --arg width=0.25); got '{pair}'.")
        out[key] = yaml.safe_load(value)
    return out


def _cmd_models(args: argparse.Namespace) -> int:
    import inspect

    import torch

    from tilewise import models
    from tilewise.models.layers import count_parameters
    from tilewise.models.maskrcnn import is_instance_arch

    arch_args = _arch_args(args.arg)
    if args.name and is_instance_arch(args.name):
        return _instance_model(args, arch_args)
    names = [models.entry(args.name).name] if args.name else models.names()
    if arch_args and not args.name:
        from tilewise.errors import ConfigError

        raise ConfigError(
            "--arg applies to one architecture: give its name (tilewise models NAME)."
        )
    print(
        f"{'name':<20} {'params':>12} {'stride':>6} {'size rule':>10} {'margin':>6} {'halo':>5}  "
        f"{'exact':<5}  summary"
    )
    for name in names:
        e = models.entry(name)
        with torch.device("meta"):
            model = models.create(
                name, in_channels=args.in_channels, num_classes=args.classes, **arch_args
            )
        f: models.TilingFacts = model.tiling  # type: ignore[assignment]
        params = count_parameters(model)
        rule = f"{f.size_rule.minimum}+{f.size_rule.step}k"
        halo = "-" if f.halo is None else str(f.halo)
        print(
            f"{name:<20} {params:>12,} {f.stride:>6} {rule:>10} {f.margin:>6} {halo:>5}  "
            f"{'yes' if f.exact else 'no':<5}  {e.summary}"
        )
    if not args.name:
        from tilewise.models.maskrcnn import INSTANCE_ARCHS

        print(
            f"\nparameters for {args.in_channels} input bands and {args.classes} classes, "
            "fixed bilinear up-sampling included; `tilewise models NAME` shows one in detail."
        )
        print(
            f"\ninstance architectures (objects, not score maps; predict jobs stitch them with "
            f"output.instances): {', '.join(INSTANCE_ARCHS)}"
        )
        return 0
    e = models.entry(names[0])
    trainable = count_parameters(model, trainable_only=True)
    print(f"  family      {e.family} ({e.paper})")
    print(f"  parameters  {params:,} ({trainable:,} trained; {params - trainable:,} fixed)")
    sig = inspect.signature(e.builder).parameters
    shown = ", ".join(f"{a}={sig[a].default!r}" for a in e.arg_names())
    print(f"  arguments   {shown or '(none)'}")
    if f.note:
        print(f"  not exact   {f.note}")
    if args.probe:
        _probe(model_name=names[0], args=args, arch_args=arch_args)
    return 0


def _instance_model(args: argparse.Namespace, arch_args: dict[str, object]) -> int:
    """``tilewise models mask_rcnn_...``: the network's size and settings."""
    import dataclasses

    import torch

    from tilewise.models.layers import count_parameters
    from tilewise.models.maskrcnn import INSTANCE_ARCHS, create_instance_model

    if args.probe:
        from tilewise.errors import ConfigError

        raise ConfigError(
            f"--probe measures the receptive field of score maps; '{args.name}' returns objects. "
            f"Leave out --probe."
        )
    classes = max(2, args.classes)
    with torch.device("meta"):
        model = create_instance_model(
            args.name, in_channels=args.in_channels, num_classes=classes, **arch_args
        )
    params = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    print(f"{args.name}: Mask R-CNN, {INSTANCE_ARCHS[args.name]} backbone + FPN (He et al. 2017)")
    print(
        f"  parameters  {params:,} for {args.in_channels} bands and {classes} classes "
        f"(background included); {trainable:,} trained"
    )
    settings = ", ".join(f"{f.name}={getattr(model.config, f.name)!r}"
                         for f in dataclasses.fields(model.config))  # fmt: skip
    print(f"  settings    {settings}")
    print(
        "  tiling      no halo of its own: windows are the write units grown by "
        "output.instances.halo (at least the largest object)"
    )
    return 0


def _probe(*, model_name: str, args: argparse.Namespace, arch_args: dict[str, object]) -> None:
    import torch

    from tilewise import models
    from tilewise.models.probe import probe_receptive_field
    from tilewise.models.weights import load_state_file

    torch.manual_seed(args.seed)
    model = models.create(
        model_name, in_channels=args.in_channels, num_classes=args.classes, **arch_args
    )
    if args.weights:
        model.load_state_dict(load_state_file(args.weights, what="--weights"))
    if not args.float32:
        model = model.double()
    f: models.TilingFacts = model.tiling  # type: ignore[assignment]
    result = probe_receptive_field(
        model,
        in_channels=args.in_channels,
        size=args.size,
        tolerance=args.tolerance,
        max_phases=args.phases,
        seed=args.seed,
    )
    weights = args.weights or f"random weights (seed {args.seed})"
    print(
        f"  probe       impulse responses in a {result.window}x{result.window} window, "
        f"{result.phases} phase(s) modulo the stride, {weights}"
    )
    if result.reaches_edge:
        print(
            f"  reach       the response reaches the window border: no finite halo within "
            f"{result.window} px (declared halo: {'none' if f.halo is None else f.halo})"
        )
        return
    s = f.stride
    aligned = f.margin + -(-(max(result.radius, f.margin) - f.margin) // s) * s
    print(
        f"  reach       {result.radius} px per side above {result.tolerance:g} x the peak "
        f"(per phase: {', '.join(map(str, result.per_phase))})"
    )
    print(
        f"  halo        smallest exact to {result.tolerance:g}: {max(result.radius, f.margin)} px "
        f"(windows then start {aligned} px before their tile); declared: "
        f"{'none' if f.halo is None else f.halo}"
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from tilewise.demo import run_demo

    run_demo(
        workdir=args.workdir,
        size=args.size,
        progress=not args.no_progress,
        steps=args.steps,
        workers=args.workers,
    )
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
    run.add_argument(
        "--workers",
        type=int,
        help="predictor actors (default: one per GPU, or 1); for a train job, its "
        "scaling.workers (0 = in-process)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output; for a train job, start its run afresh",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.add_argument(
        "--plan",
        action="store_true",
        help="print units, windows, overlap overhead and memory per actor; compute nothing",
    )
    run.set_defaults(func=_cmd_run)

    from tilewise.submit import add_arguments, cmd_submit

    sbm = sub.add_parser("submit", help="submit a job spec to a Ray cluster as a Ray job")
    add_arguments(sbm)
    sbm.set_defaults(func=cmd_submit)

    val = sub.add_parser("validate", help="check job specs; report every problem of every file")
    val.add_argument("jobs", nargs="+", help="YAML job specs")
    val.set_defaults(func=_cmd_validate)

    sch = sub.add_parser("schema", help="print the JSON schema of job specs (for editors)")
    sch.set_defaults(func=_cmd_schema)

    mod = sub.add_parser("models", help="list the architectures and their tiling facts")
    mod.add_argument("name", nargs="?", help="one architecture")
    mod.add_argument("--in-channels", type=int, default=3, help="input bands (default 3)")
    mod.add_argument("--classes", type=int, default=2, help="output classes (default 2)")
    mod.add_argument(
        "--arg", action="append", default=[], help="architecture argument key=value (repeatable)"
    )
    mod.add_argument(
        "--probe",
        action="store_true",
        help="measure the receptive field by impulse responses and the halo it needs",
    )
    mod.add_argument("--size", type=int, help="probe window side (default: from the halo)")
    mod.add_argument(
        "--tolerance", type=float, default=1e-4, help="relative response counted as zero"
    )
    mod.add_argument("--phases", type=int, default=8, help="impulse phases modulo the stride")
    mod.add_argument("--weights", help="probe trained weights (.safetensors or .pt)")
    mod.add_argument("--seed", type=int, default=0, help="seed of the random weights and image")
    mod.add_argument("--float32", action="store_true", help="probe in float32 (default float64)")
    mod.set_defaults(func=_cmd_models)

    demo = sub.add_parser(
        "demo",
        help="train a U-Net on a real IHC slide with Ray Train, then segment a mosaic of it",
    )
    demo.add_argument("--workdir", default="tilewise-demo", help="folder for data and results")
    demo.add_argument("--size", type=int, default=4096, help="mosaic side in pixels")
    demo.add_argument(
        "--steps", type=int, help="training steps (default: jobs/ihc-train.yaml's, 600)"
    )
    demo.add_argument(
        "--workers",
        type=int,
        help="Ray Train workers, 0 = in this process (default 1; at most 3, one per shard)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)

    ing = sub.add_parser(
        "ingest",
        help="convert a GeoTIFF/COG, slide (TIFF, SVS, OME-TIFF) or PNG into OME-Zarr",
    )
    ing.add_argument("src", help="the image file")
    ing.add_argument("dst", help="the OME-Zarr image to write (DST.zarr)")
    ing.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    ing.add_argument("--chunk", type=int, default=1024, help="chunk side in px (default 1024)")
    ing.add_argument("--levels", type=int, help="pyramid levels (default: down to ~512 px)")
    ing.add_argument("--workers", type=int, help="reader threads (default up to 4)")
    ing.add_argument("--json", action="store_true", help="print the report as JSON")
    ing.set_defaults(func=_cmd_ingest)

    sh = sub.add_parser(
        "shards",
        help="cut an image and its label raster into training shards for a train job",
    )
    sh.add_argument("image", help="the image: a GeoTIFF, TIFF, slide, PNG, or a Zarr image")
    sh.add_argument("labels", help="its label raster: one band of ids, the same size and grid")
    sh.add_argument("dest", help="the folder for the shards (NAME-ROW-COL.zarr)")
    sh.add_argument(
        "--size", type=int, default=2048, help="smallest shard side in px (default 2048)"
    )
    sh.add_argument("--chunk", type=int, default=512, help="chunk side in px (default 512)")
    what = sh.add_mutually_exclusive_group()
    what.add_argument(
        "--instances",
        action="store_true",
        help="the labels are object ids (0 = background): instance shards for Mask R-CNN",
    )
    what.add_argument(
        "--unet-weights",
        action="store_true",
        help="the labels are object ids (0 = background): U-Net's targets for touching cells, "
        "'label' with gaps between cells and 'weight', its weight map",
    )
    sh.add_argument("--w0", type=float, default=10.0, help="--unet-weights: w0 (default 10)")
    sh.add_argument("--sigma", type=float, default=5.0, help="--unet-weights: sigma (default 5)")
    sh.add_argument(
        "--ignore-index",
        type=int,
        default=255,
        help="label of unlabelled pixels: the labels' no-data, the image's no-data collar "
        "(default 255, the train job's data.ignore_index)",
    )
    sh.add_argument(
        "--keep-empty", action="store_true", help="also write shards with no labelled pixel"
    )
    sh.add_argument("--name", help="the shards' name (default: the image's file name)")
    sh.add_argument("--overwrite", action="store_true", help="replace an earlier cut of NAME")
    sh.add_argument("--workers", type=int, help="writer threads (default up to 4)")
    sh.add_argument("--json", action="store_true", help="print the report as JSON")
    sh.set_defaults(func=_cmd_shards)

    exp = sub.add_parser(
        "export",
        help="write a finished output as a COG (.tif) or a pyramidal OME-TIFF (.ome.tif)",
    )
    exp.add_argument("output", help="the output store of a predict job (OUT.zarr)")
    exp.add_argument("dst", help="the file to write: .tif = COG, .ome.tif = OME-TIFF")
    exp.add_argument(
        "--what", choices=["labels", "probabilities"], default="labels", help="which image"
    )
    exp.add_argument(
        "--format", choices=["cog", "ome-tiff"], help="the format (default: from the extension)"
    )
    exp.add_argument("--overwrite", action="store_true", help="replace an existing file")
    exp.add_argument("--json", action="store_true", help="print the report as JSON")
    exp.set_defaults(func=_cmd_export)

    sco = sub.add_parser(
        "score",
        help="the FCN metrics (pixel accuracy, mean IU, ...) of an output against reference labels",
    )
    sco.add_argument(
        "output",
        help="the output store of a predict job (OUT.zarr), or the job (JOB.yaml): every "
        "image's output, and all of them together",
    )
    sco.add_argument(
        "labels",
        help="the reference: one band of class ids, the output's size and grid (GeoTIFF, TIFF, "
        "PNG or Zarr); its no-data pixels are not counted. With JOB.yaml, {stem} stands for "
        "each image's name (truth/{stem}.tif)",
    )
    sco.add_argument(
        "--ignore-index",
        type=int,
        help="a reference value that marks unlabelled pixels, not counted (e.g. 255)",
    )
    sco.add_argument(
        "--instances",
        action="store_true",
        help="the reference holds object ids (0 = background): match the output's instances/ "
        "to them at IoU 0.5 to 0.95 (precision, recall, F1, panoptic quality)",
    )
    sco.add_argument("--workers", type=int, help="reader threads (default up to 4)")
    sco.add_argument("--json", action="store_true", help="print the report as JSON")
    sco.set_defaults(func=_cmd_score)

    pre = sub.add_parser(
        "preview",
        help="draw an output's labels over its input, with a legend, as a PNG quicklook",
    )
    pre.add_argument("output", help="the output store of a predict job (OUT.zarr)")
    pre.add_argument("png", nargs="?", help="the PNG to write (default: OUT.preview.png)")
    pre.add_argument(
        "--level",
        type=_level_arg,
        default="auto",
        help="pyramid level, 0 = full resolution (default auto: the finest within --max-size)",
    )
    pre.add_argument(
        "--max-size", type=int, default=2048, help="longest side 'auto' aims for (default 2048)"
    )
    pre.set_defaults(func=_cmd_preview)
    return p


class _WarningLines(logging.Handler):
    """``warning: ...`` on stderr, like the CLI's ``error: ...`` lines and the plan's warnings.

    ``sys.stderr`` is looked up for every record, so a replaced stderr (a test's capture) is used.
    """

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _show_warnings() -> None:
    """tilewise's log warnings (a stalled run, actors that cannot all start) on stderr, once;
    and its Python warnings (an approximate blend halo) as the same ``warning: ...`` lines,
    each once, rather than Python's "file:line: TilingWarning" with the source line."""
    logger = logging.getLogger("tilewise")
    if not any(isinstance(h, _WarningLines) for h in logger.handlers):
        logger.addHandler(_WarningLines(logging.WARNING))
    import warnings

    from tilewise.pipeline.geometry import TilingWarning

    default = warnings.showwarning
    if getattr(default, "tilewise", False):
        return
    said: set[str] = set()

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        if not issubclass(category, TilingWarning):
            default(message, category, filename, lineno, file, line)
        elif str(message) not in said:  # validation and the run both check the tiling
            said.add(str(message))
            print(f"warning: {message}", file=sys.stderr)

    show.tilewise = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tilewise`` console script."""
    args = _parser().parse_args(argv)
    _show_warnings()
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
