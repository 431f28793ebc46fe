"""The ``tilewise`` command in-process: bad input gives one clear error line and no output.

Every error here is found before Ray would start (spec validation, ``prepare``, the output guard),
so no test in this file starts Ray: an autouse fixture makes starting it fail the test.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
import zarr

from tilewise import models
from tilewise.cli import main
from tilewise.pipeline import driver
from tilewise.pipeline.job import prepare
from tilewise.pipeline.output import OutputStore
from tilewise.spec import load_job

BASE: dict[str, Any] = {
    "kind": "predict",
    "input": {"path": "in.zarr"},
    "model": {"arch": "unet_same", "num_classes": 2, "args": {"depth": 2, "base_width": 2}},
    "tiling": {"tile": 32},
    "output": {"path": "out.zarr"},
}


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")

    def refuse(address: str | None) -> bool:
        raise AssertionError("this test must fail before Ray starts, but run_job tried to")

    monkeypatch.setattr(driver, "_connect", refuse)


def write_input(
    folder: Path,
    name: str = "in.zarr",
    dimension_names: tuple[str, ...] | None = ("c", "y", "x"),
) -> Path:
    """A small valid 3-band uint8 image (3, 64, 80)."""
    path = folder / name
    data = np.arange(3 * 64 * 80, dtype=np.uint8).reshape(3, 64, 80)
    zarr.create_array(path, data=data, chunks=(3, 32, 32), dimension_names=dimension_names)
    return path


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, section by section (nested mappings merge)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_job(folder: Path, changes: dict[str, Any] | None = None, name: str = "job.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(merged(BASE, changes or {}), sort_keys=False))
    return path


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``tilewise ARGV`` in-process; (exit code, stdout, stderr).

    An exception escaping ``main`` is what the user would see as a traceback: a test failure.
    """
    try:
        code = main(argv)
    except Exception as exc:
        pytest.fail(
            f"`tilewise {' '.join(argv)}` crashed with {type(exc).__name__}: {exc} -- a user "
            f"error should print one 'error:' line and exit 2, not a traceback"
        )
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The single ``error:`` line of stderr (asserting there is exactly one and nothing else)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one error line, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def assert_no_output(folder: Path) -> None:
    assert not (folder / "out.zarr").exists(), "a pre-flight error must not create the output"


# ---------------------------------------------------------------------------------------------
# run: bad input -> one error line, exit 2, no output
# ---------------------------------------------------------------------------------------------

# (id, job changes, fragments the error line must contain: the problem, then the fix)
SPEC_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "missing-store",
        {"input": {"path": "nope.zarr"}},
        ["nope.zarr", "does not exist", "Check the path"],
    ),
    (
        "axes-yx-for-3d",
        {"input": {"axes": "yx"}},
        ["input.axes 'yx'", "3 dimensions", "(3, 64, 80)", "use cyx or yxc"],
    ),
    (
        "channels-not-matching",
        {"model": {"in_channels": 4}},
        ["4 input channels", "has 3", "model.in_channels: 3"],
    ),
    (
        "tile-off-stride",
        {"tiling": {"tile": 30}},
        ["tiling.tile", "must be a multiple of 4", "unet_same", "Use tile: 28 or 32"],
    ),
    (
        "halo-larger-than-tile",
        {"tiling": {"halo": 40}},
        ["tiling.halo", "halo (40) must not exceed the tile (32)", "Use tile: 40"],
    ),
    (
        "halo-too-small-for-crop",
        {"tiling": {"halo": 5}},
        ["tiling.halo", "too small", "Use halo: 23", "stitch: blend"],
    ),
    (
        "unknown-nested-key",
        {"tiling": {"tilee": 32}},
        ["tiling.tilee", "unknown key 'tilee'", "Did you mean 'tile'?"],
    ),
    (
        "unknown-top-level-key",
        {"outptu": {}},
        ["outptu", "unknown key 'outptu'", "Did you mean 'output'?"],
    ),
    (
        "unknown-architecture",
        {"model": {"arch": "unet2"}},
        ["model.arch", "unknown architecture 'unet2'", "Did you mean 'unet'?", "tilewise models"],
    ),
    (
        "unknown-arch-argument",
        {"model": {"args": {"deph": 2}}},
        ["model.args.deph", "unknown argument 'deph'", "Did you mean 'depth'?"],
    ),
    (
        "group-without-array",
        {"input": {"path": "group.zarr"}},
        ["is a Zarr group, not an image", "input.array"],
    ),
    (
        "missing-weights",
        {"model": {"weights": "weights.safetensors"}},
        ["model.weights", "weights.safetensors", "does not exist"],
    ),
    (
        "labels-too-many-classes",
        {"model": {"num_classes": 300}},
        ["num_classes 300", "Use labels: uint16"],
    ),
    (
        "chunk-off-tile",
        {"output": {"chunk": 48}},
        ["output.chunk (48) must be a multiple of the tile (32)", "Use chunk: 32 or 64"],
    ),
]


@pytest.mark.parametrize(
    ("changes", "fragments"), [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES]
)
def test_run_bad_job_prints_one_clear_line_and_creates_no_output(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, Any],
    fragments: list[str],
) -> None:
    write_input(tmp_path)
    zarr.open_group(tmp_path / "group.zarr", mode="w")
    job = write_job(tmp_path, changes)

    code, out, err = cli(["run", str(job), "--no-progress"], capsys)

    assert code == 2
    assert out == ""
    line = one_error_line(err)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} missing from: {line}"
    assert_no_output(tmp_path)


def test_spec_errors_name_the_job_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_input(tmp_path)
    job = write_job(tmp_path, {"tiling": {"tile": 30}})

    code, _, err = cli(["run", str(job)], capsys)

    assert code == 2
    assert one_error_line(err).startswith(f"error: {job}: tiling.tile: ")


def test_run_3d_input_without_dimension_names_asks_for_axes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_input(tmp_path, dimension_names=None)
    job = write_job(tmp_path)

    code, out, err = cli(["run", str(job)], capsys)

    assert code == 2
    assert out == ""
    line = one_error_line(err)
    assert "cannot tell the axes" in line
    assert "(3, 64, 80)" in line
    assert "set input.axes" in line
    assert "'cyx'" in line and "'yxc'" in line
    assert_no_output(tmp_path)


def test_run_with_axes_set_accepts_the_unnamed_array(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Control for the case above: with input.axes the same input passes every pre-flight check
    (the run then gets as far as starting Ray, which this file refuses)."""
    write_input(tmp_path, dimension_names=None)
    job = write_job(tmp_path, {"input": {"axes": "cyx"}})

    with pytest.raises(AssertionError, match="before Ray starts"):
        main(["run", str(job), "--no-progress"])


def test_run_unreadable_yaml_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_input(tmp_path)
    lines = yaml.safe_dump(BASE, sort_keys=False).splitlines()
    broken = lines.index("tiling:") + 1  # the "  tile: 32" line, 1-based below
    lines[broken] = "  tile: 32: 4"  # a second ':' on the line: a syntax error
    job = tmp_path / "job.yaml"
    job.write_text("\n".join(lines) + "\n")

    code, out, err = cli(["run", str(job)], capsys)

    assert code == 2
    assert out == ""
    line = one_error_line(err)
    assert str(job) in line
    assert f"cannot parse YAML at line {broken + 1}, column " in line
    assert "mapping values are not allowed here" in line
    assert_no_output(tmp_path)


def test_run_yaml_with_tab_indentation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("kind: predict\ninput:\n\tpath: in.zarr\n")

    code, _, err = cli(["run", str(job)], capsys)

    assert code == 2
    line = one_error_line(err)
    assert "cannot parse YAML at line 3" in line


def test_run_missing_job_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "nope.yaml"

    code, out, err = cli(["run", str(job)], capsys)

    assert code == 2
    assert out == ""
    assert one_error_line(err) == f"error: {job}: file not found"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "the file is empty"),
        ("- a\n- b\n", "the top level must be a YAML mapping"),
    ],
    ids=["empty", "list"],
)
def test_run_job_file_that_is_not_a_mapping(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, fragment: str
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(text)

    code, _, err = cli(["run", str(job)], capsys)

    assert code == 2
    assert fragment in one_error_line(err)


def test_run_job_path_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["run", str(tmp_path)], capsys)

    assert code == 2
    assert "is a folder, not a YAML job file" in one_error_line(err)


def test_run_several_problems_print_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_input(tmp_path)
    job = write_job(tmp_path, {"tiling": {"tilee": 32}, "model": {"arch": "unet2"}})

    code, _, err = cli(["run", str(job)], capsys)

    assert code == 2
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"error: {job}: ") for line in lines)
    assert any("model.arch" in line and "Did you mean 'unet'?" in line for line in lines)
    assert any("tiling.tilee" in line and "Did you mean 'tile'?" in line for line in lines)
    assert_no_output(tmp_path)


# ---------------------------------------------------------------------------------------------
# run: corrupt weights files (user mistakes that currently escape as tracebacks)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("weights.pt", lambda p: p.write_bytes(b"this is not a torch file")),
        ("weights.safetensors", lambda p: p.write_bytes(b"this is not a safetensors file")),
        ("weights_folder", lambda p: p.mkdir()),
    ],
    ids=["garbage-pt", "garbage-safetensors", "folder"],
)
def test_run_unreadable_weights_is_a_clear_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, make: Any
) -> None:
    """A weights file that cannot be loaded is a user mistake like a missing one.

    Errors of ``torch.load`` on a file that is not a torch file (UnpicklingError or IndexError,
    depending on the bytes), of ``safetensors.torch.load`` (SafetensorError) and of reading a
    folder (IsADirectoryError) must become one ``error: model.weights '...' cannot be read ...``
    line and exit 2 (``tilewise.models.weights.load_state_file``).
    """
    write_input(tmp_path)
    make(tmp_path / name)
    job = write_job(tmp_path, {"model": {"weights": name}})

    code, _, err = cli(["run", str(job)], capsys)

    assert code == 2
    line = one_error_line(err)
    assert name in line
    assert_no_output(tmp_path)


# ---------------------------------------------------------------------------------------------
# run: an existing output of another job is refused and left untouched
# ---------------------------------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_run_refuses_output_of_a_different_tilewise_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_input(tmp_path)
    # Another job (another seed: other output bytes) wrote out.zarr, finished one unit, completed.
    other = prepare(load_job(write_job(tmp_path, {"model": {"seed": 1}}, name="other.yaml")))
    store = OutputStore(other.job.output.path)
    resumed = store.prepare(
        other.layout,
        fingerprint=other.fingerprint,
        job=other.job.model_dump(mode="json"),
        carried={},
        overwrite=False,
    )
    assert not resumed
    unit = other.grid.unit(0)
    store.write_unit(unit, np.zeros((2, unit.y1 - unit.y0, unit.x1 - unit.x0), np.float32))
    store.finish({"note": "other job"})
    out_dir = tmp_path / "out.zarr"
    (out_dir / "keep.txt").write_text("mine")
    before = _tree(out_dir)
    assert (out_dir / ".tilewise" / "done" / "0").exists()

    job = write_job(tmp_path)  # seed 0: a different job, same output path
    code, out, err = cli(["run", str(job), "--no-progress"], capsys)

    assert code == 2
    assert out == ""
    line = one_error_line(err)
    assert "exists and was written by a different job" in line
    assert "--overwrite" in line
    assert _tree(out_dir) == before
    state = zarr.open_group(out_dir, mode="r").attrs["tilewise"]
    assert state["fingerprint"] == other.fingerprint
    assert state["status"] == "complete"


@pytest.mark.parametrize("kind", ["plain-folder", "foreign-zarr-group", "plain-file"])
def test_run_refuses_output_not_written_by_tilewise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    write_input(tmp_path)
    out_path = tmp_path / "out.zarr"
    if kind == "plain-file":
        out_path.write_text("mine")
    else:
        if kind == "foreign-zarr-group":
            zarr.open_group(out_path, mode="w").attrs["owner"] = "someone else"
        else:
            out_path.mkdir()
        (out_path / "keep.txt").write_text("mine")
    before = _tree(out_path) if out_path.is_dir() else out_path.read_bytes()
    job = write_job(tmp_path)

    code, _, err = cli(["run", str(job)], capsys)

    assert code == 2
    line = one_error_line(err)
    assert "something other than tilewise" in line
    assert "--overwrite" in line
    assert (_tree(out_path) if out_path.is_dir() else out_path.read_bytes()) == before


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------


def test_validate_reports_every_problem_of_every_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = write_job(tmp_path, {"tiling": {"tilee": 32}}, name="a.yaml")
    b_data = merged(BASE, {"model": {"arch": "unet2"}})
    del b_data["output"]
    b = tmp_path / "b.yaml"
    b.write_text(yaml.safe_dump(b_data))

    code, out, err = cli(["validate", str(a), str(b)], capsys)

    assert code == 1
    assert "Traceback" not in err
    assert "ok" not in out
    lines = err.splitlines()
    assert f"{a}: tiling.tilee: unknown key 'tilee'. Did you mean 'tile'?" in lines
    assert any(line.startswith(f"{b}: model.arch: unknown architecture 'unet2'.") for line in lines)
    assert f"{b}: output: required field missing" in lines
    assert len(lines) == 3


def test_validate_mixed_files_reports_ok_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_job(tmp_path, name="good.yaml")
    bad = write_job(tmp_path, {"tiling": {"tile": 30}}, name="bad.yaml")

    code, out, err = cli(["validate", str(bad), str(good)], capsys)

    assert code == 1
    assert out.splitlines() == [f"{good}: ok"]
    assert err.splitlines()[0].startswith(f"{bad}: tiling.tile: tile (30) must be a multiple of 4")


def test_validate_good_files_print_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_job(tmp_path, name="a.yaml")
    b = write_job(tmp_path, {"tiling": {"tile": 64, "stitch": "blend"}}, name="b.yaml")

    code, out, err = cli(["validate", str(a), str(b)], capsys)

    assert code == 0
    assert err == ""
    assert out.splitlines() == [f"{a}: ok", f"{b}: ok"]


def test_validate_missing_and_unparsable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: predict\ninput: {path: x\n")

    code, _, err = cli(["validate", str(missing), str(broken)], capsys)

    assert code == 1
    lines = err.splitlines()
    assert lines[0] == f"{missing}: file not found"
    assert lines[1].startswith(f"{broken}: cannot parse YAML at line ")
    assert len(lines) == 2


# ---------------------------------------------------------------------------------------------
# schema and models
# ---------------------------------------------------------------------------------------------


def test_schema_prints_parseable_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["schema"], capsys)

    assert code == 0
    assert err == ""
    schema = json.loads(out)
    assert "oneOf" in schema
    assert schema["discriminator"]["propertyName"] == "kind"
    assert "predict" in schema["discriminator"]["mapping"]


def _param_count(name: str, in_channels: int) -> int:
    torch.manual_seed(0)
    model = models.create(name, in_channels=in_channels, num_classes=2)
    return sum(p.numel() for p in model.parameters())


def test_models_lists_architectures_with_parameter_counts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = cli(["models"], capsys)

    assert code == 0
    assert err == ""
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert {"unet", "unet_same"} <= set(rows)
    assert out.splitlines()[0].split()[:2] == ["name", "params"]
    for name in ("unet", "unet_same"):
        count = _param_count(name, in_channels=3)
        assert rows[name].split()[1] == f"{count:,}", rows[name]
    # The column is the paper's U-Net: 31,030,658 weights for 1 band, 2 classes; 3 bands add
    # 2 * 64 * 3 * 3 to the first convolution.
    assert _param_count("unet", in_channels=1) == 31_030_658
    assert rows["unet"].split()[1] == f"{31_030_658 + 2 * 64 * 9:,}"


def test_models_one_name(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["models", "unet_same"], capsys)

    assert code == 0
    rows = [line for line in out.splitlines()[1:] if line.strip()]
    assert rows[0].split()[0] == "unet_same"
    assert all(line.startswith("  ") for line in rows[1:])  # the details, indented
    assert any("arguments   depth=4, base_width=64" in line for line in rows)


def test_models_probe_reports_the_reach_and_the_declared_halo(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--arg", "depth=2", "--arg", "base_width=2", "--probe", "--phases", "2"]
    code, out, err = cli(["models", "unet_same", *args], capsys)

    assert code == 0, err
    reach = next(line for line in out.splitlines() if line.strip().startswith("reach"))
    radius = int(reach.split()[1])
    halo = next(line for line in out.splitlines() if line.strip().startswith("halo"))
    # depth 2: the declared (analytic) halo is 7 * 4 - 5 = 23; the measured reach cannot exceed it.
    assert 0 < radius <= 23
    assert halo.rstrip().endswith("declared: 23")


def test_models_arg_needs_key_value(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["models", "unet", "--arg", "depth"], capsys)

    assert code == 2
    assert "--arg takes key=value" in one_error_line(err)


def test_models_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["models", "unet2"], capsys)

    assert code == 2
    line = one_error_line(err)
    assert "unknown architecture 'unet2'" in line
    assert "Did you mean 'unet'?" in line


def test_an_approximate_tiling_is_one_warning_line_not_a_python_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_input(tmp_path)
    job = write_job(tmp_path, {"tiling": {"tile": 32, "halo": 10, "stitch": "blend"}})
    code, _, err = cli(["run", "--plan", str(job)], capsys)
    assert code == 0
    said = [line for line in err.splitlines() if "halo 10 is below" in line]
    assert said == [
        "warning: halo 10 is below the 23 px that makes arch 'unet_same' exact: blended tiles "
        "will differ slightly from whole-image inference."
    ]  # once, although the job's validation and the plan both check the tiling
    assert "TilingWarning" not in err and ".py:" not in err


def test_log_warnings_print_as_warning_lines_once(capsys: pytest.CaptureFixture[str]) -> None:
    # What `tilewise run` logs while it runs (a stall, actors that cannot all start) reads like
    # the plan's warnings, and setting up twice (main called twice in one process) prints once.
    import logging

    from tilewise.cli import _show_warnings

    _show_warnings()
    _show_warnings()
    logging.getLogger("tilewise.pipeline.driver").warning("no unit has finished for %d s", 30)
    assert capsys.readouterr().err == "warning: no unit has finished for 30 s\n"
