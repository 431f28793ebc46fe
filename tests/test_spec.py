"""Tests of the YAML job specs: loading, path resolution, error reporting, JSON schema."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tilewise.errors import ConfigError
from tilewise.spec import (
    JOB_KINDS,
    PredictJob,
    TrainJob,
    job_errors,
    json_schema,
    load_job,
    parse_job,
    resolve_location,
    validate_files,
)

JOBS_DIR = Path(__file__).parents[1] / "jobs"

MINIMAL: dict[str, Any] = {
    "kind": "predict",
    "input": {"path": "slide.zarr"},
    "model": {"arch": "unet", "num_classes": 2},
    "output": {"path": "out.zarr"},
}


def job(**sections: dict[str, Any]) -> dict[str, Any]:
    """The minimal job with some sections' keys replaced or added."""
    data = copy.deepcopy(MINIMAL)
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def write(folder: Path, data: Any, name: str = "job.yaml") -> Path:
    """Write a job (a mapping, or raw YAML text) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def errors_of(tmp_path: Path, data: Any) -> list[str]:
    return job_errors(write(tmp_path, data))


# ---------------------------------------------------------------------------------------------
# Valid jobs and paths
# ---------------------------------------------------------------------------------------------


def test_minimal_job_loads_with_defaults_and_file_stem_as_name(tmp_path: Path) -> None:
    loaded = load_job(write(tmp_path, MINIMAL, name="slide42.yaml"))
    assert isinstance(loaded, PredictJob)
    assert loaded.name == "slide42"
    assert loaded.tiling.tile == 512
    assert loaded.tiling.halo is None
    assert loaded.tiling.stitch == "crop"
    assert loaded.output.labels == "uint8"
    assert loaded.output.probabilities is None
    assert loaded.input.normalize.scale == "auto"
    assert loaded.compute.device == "auto"


def test_name_given_in_the_file_is_kept(tmp_path: Path) -> None:
    loaded = load_job(write(tmp_path, {**MINIMAL, "name": "my run"}))
    assert loaded.name == "my run"


def test_relative_paths_resolve_against_the_yaml_folder_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = tmp_path / "specs"
    path = write(specs, job(model={"weights": "weights/unet.safetensors"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_job(path)
    assert loaded.input.path == str(specs / "slide.zarr")
    assert loaded.output.path == str(specs / "out.zarr")
    assert loaded.model.weights == str(specs / "weights" / "unet.safetensors")


def test_relative_path_loaded_from_relative_file_name_resolves_against_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "specs", MINIMAL)
    monkeypatch.chdir(tmp_path)
    loaded = load_job(Path("specs") / "job.yaml")
    assert loaded.input.path == str(tmp_path / "specs" / "slide.zarr")


def test_parse_job_without_base_dir_resolves_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_job(MINIMAL).input.path == str(tmp_path / "slide.zarr")


def test_file_url_becomes_plain_absolute_path(tmp_path: Path) -> None:
    loaded = load_job(write(tmp_path, job(output={"path": "file:///data/run/../out.zarr"})))
    assert loaded.output.path == "/data/out.zarr"


def test_s3_uri_is_kept_as_written(tmp_path: Path) -> None:
    loaded = load_job(write(tmp_path, job(input={"path": "s3://bucket/slides/a.zarr"})))
    assert loaded.input.path == "s3://bucket/slides/a.zarr"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("memory://x.zarr", "memory://x.zarr"),
        ("simplecache::s3://b/x.zarr", "simplecache::s3://b/x.zarr"),
        ("file://rel/x.zarr", "/base/rel/x.zarr"),
        ("/abs/x.zarr", "/abs/x.zarr"),
        ("a/../b.zarr", "/base/b.zarr"),
    ],
)
def test_resolve_location(value: str, expected: str) -> None:
    assert resolve_location(value, Path("/base")) == expected


# ---------------------------------------------------------------------------------------------
# Field errors
# ---------------------------------------------------------------------------------------------


def test_unknown_top_level_key_suggests_the_close_one(tmp_path: Path) -> None:
    data = job()
    data["tilng"] = {"tile": 256}
    path = write(tmp_path, data)
    assert job_errors(path) == [f"{path}: tilng: unknown key 'tilng'. Did you mean 'tiling'?"]


def test_unknown_nested_key_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(tmp_path, job(tiling={"tilee": 256}))
    assert job_errors(path) == [f"{path}: tiling.tilee: unknown key 'tilee'. Did you mean 'tile'?"]


def test_unknown_key_without_close_match_lists_allowed_keys(tmp_path: Path) -> None:
    (line,) = errors_of(tmp_path, job(compute={"banana": 1}))
    assert line.endswith(
        "compute.banana: unknown key 'banana'. Allowed keys: address, workers, device, "
        "cpus_per_worker, gpus_per_worker, actors_per_gpu, precision, prefetch."
    )


@pytest.mark.parametrize(
    ("section", "key", "value", "home"),
    [
        ("output", "mask", {"method": "nodata"}, "input.mask"),
        ("input", "tile", 256, "tiling.tile"),
        (None, "workers", 2, "compute.workers"),
    ],
)
def test_a_key_in_the_wrong_section_is_sent_where_it_belongs(
    tmp_path: Path, section: str | None, key: str, value: object, home: str
) -> None:
    data = job()
    (data[section] if section else data)[key] = value
    (line,) = errors_of(tmp_path, data)
    dotted = f"{section}.{key}" if section else key
    assert f"{dotted}: unknown key '{key}' here. It belongs at '{home}': move it there." in line
    assert "Allowed keys here: " in line


def test_missing_required_field(tmp_path: Path) -> None:
    data = job()
    del data["output"]["path"]
    path = write(tmp_path, data)
    assert job_errors(path) == [f"{path}: output.path: required field missing"]


def test_wrong_enum_value_lists_the_choices_and_the_given_value(tmp_path: Path) -> None:
    path = write(tmp_path, job(tiling={"stitch": "blur"}))
    assert job_errors(path) == [
        f"{path}: tiling.stitch: must be one of 'crop', 'blend', 'sliding'; got 'blur'"
    ]


def test_list_item_error_has_its_index_in_the_path(tmp_path: Path) -> None:
    (line,) = errors_of(tmp_path, job(input={"normalize": {"std": [0.2, 0.0, 0.3]}}))
    assert ": input.normalize.std.1: must be > " in line


def test_several_errors_in_one_file_are_all_reported(tmp_path: Path) -> None:
    data = job(tiling={"tilee": 256, "stitch": "blur"}, model={"num_classes": 0})
    del data["output"]["path"]
    errors = errors_of(tmp_path, data)
    paths = {line.split(": ")[1] for line in errors}
    assert paths == {"tiling.tilee", "tiling.stitch", "model.num_classes", "output.path"}


def test_load_job_raises_config_error_listing_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, job(tiling={"stitch": "blur", "batch_size": 0}))
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert str(info.value).splitlines() == [
        f"{path}: tiling.stitch: must be one of 'crop', 'blend', 'sliding'; got 'blur'",
        f"{path}: tiling.batch_size: must be >= 1; got 0",
    ]


def test_validate_files_reports_the_errors_of_every_file(tmp_path: Path) -> None:
    good = write(tmp_path, MINIMAL, name="good.yaml")
    bad_a = write(tmp_path, job(tiling={"tile": 0}), name="a.yaml")
    bad_b = write(tmp_path, job(output={"compressor": "gzip"}), name="b.yaml")
    result = validate_files([good, bad_a, bad_b])
    assert result[str(good)] == []
    assert [line.split(": ")[1] for line in result[str(bad_a)]] == ["tiling.tile"]
    assert [line.split(": ")[1] for line in result[str(bad_b)]] == ["output.compressor"]


def test_parse_job_prefixes_lines_with_the_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^api: tiling.tile: must be >= 1; got 0$"):
        parse_job(job(tiling={"tile": 0}), base_dir=tmp_path, source="api")


# ---------------------------------------------------------------------------------------------
# Kinds and architectures
# ---------------------------------------------------------------------------------------------


def test_unknown_kind_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(tmp_path, {**MINIMAL, "kind": "predcit"})
    assert job_errors(path) == [
        f"{path}: kind: unknown job kind 'predcit'. Did you mean 'predict'? Known kinds: "
        "'predict', 'train'"
    ]


def test_missing_kind_is_an_error_at_kind(tmp_path: Path) -> None:
    data = job()
    del data["kind"]
    (line,) = errors_of(tmp_path, data)
    assert ": kind: required field missing" in line


def test_job_kinds_table_maps_each_kind_to_its_model() -> None:
    assert list(JOB_KINDS) == ["predict", "train"]
    assert JOB_KINDS["predict"] is PredictJob and JOB_KINDS["train"] is TrainJob


def test_unknown_arch_suggests_the_close_one(tmp_path: Path) -> None:
    (line,) = errors_of(tmp_path, job(model={"arch": "unet2"}))
    assert ": model.arch: unknown architecture 'unet2'. Did you mean 'unet'? " in line
    assert "Known architectures: " in line and "unet, unet_same (list them with" in line


def test_unknown_arch_argument_names_the_allowed_ones(tmp_path: Path) -> None:
    (line,) = errors_of(tmp_path, job(model={"args": {"dpeth": 3}}))
    assert ": model.args.dpeth: unknown argument 'dpeth' for arch 'unet'. " in line
    assert "Did you mean 'depth'?" in line
    assert "It takes: depth, base_width, dropout." in line


def test_class_names_must_match_num_classes(tmp_path: Path) -> None:
    (line,) = errors_of(tmp_path, job(model={"class_names": ["background"]}))
    assert ": model.class_names: " in line
    assert "got 1 names" in line


# ---------------------------------------------------------------------------------------------
# Output and tiling rules
# ---------------------------------------------------------------------------------------------


def test_shard_must_be_a_multiple_of_chunk(tmp_path: Path) -> None:
    (line,) = errors_of(tmp_path, job(output={"chunk": 256, "shard": 1000}))
    assert line.endswith(
        "output.shard: shard (1000) must be a multiple of chunk (256); got 1000. "
        "Use shard: 768 or 1024."
    )


def test_at_least_one_output_must_be_selected(tmp_path: Path) -> None:
    (line,) = errors_of(tmp_path, job(output={"labels": None, "probabilities": None}))
    assert ": output: nothing to write: labels and probabilities are both null." in line


def test_probabilities_alone_are_a_valid_output(tmp_path: Path) -> None:
    assert errors_of(tmp_path, job(output={"labels": None, "probabilities": "float16"})) == []


def test_tile_off_the_stride_is_reported_at_tiling_tile(tmp_path: Path) -> None:
    path = write(tmp_path, job(tiling={"tile": 500}))
    (line,) = job_errors(path)
    assert line.startswith(f"{path}: tiling.tile: ")
    assert "496" in line
    assert "512" in line


def test_halo_below_the_margin_is_reported_at_tiling_halo(tmp_path: Path) -> None:
    (line,) = errors_of(tmp_path, job(tiling={"halo": 10}))
    assert ": tiling.halo: halo (10) " in line


def test_cross_field_problems_are_reported_together(tmp_path: Path) -> None:
    data = job(
        model={"class_names": ["a"]},
        output={"chunk": 256, "shard": 1000},
        tiling={"tile": 500},
    )
    paths = {line.split(": ")[1] for line in errors_of(tmp_path, data)}
    assert paths == {"model.class_names", "output.shard", "tiling.tile"}


# ---------------------------------------------------------------------------------------------
# Unreadable files
# ---------------------------------------------------------------------------------------------


def test_yaml_syntax_error_shows_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "kind: predict\ninput:\n  path: a.zarr\n   level: [1\n")
    (line,) = job_errors(path)
    assert line.startswith(f"{path}: cannot parse YAML at line 4, column 9: ")


def test_empty_file_is_one_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    (line,) = job_errors(path)
    assert line.startswith(f"{path}: the file is empty")


def test_list_at_top_level_is_one_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, "- kind: predict\n")
    assert job_errors(path) == [
        f"{path}: the top level must be a YAML mapping (kind: predict, input: ..., ...); got a list"
    ]


def test_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert job_errors(path) == [f"{path}: file not found"]


def test_load_job_of_missing_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_job(tmp_path / "nope.yaml")


def test_python_object_tag_is_rejected_as_parse_error(tmp_path: Path) -> None:
    path = write(tmp_path, "kind: !!python/object/apply:os.getcwd []\n")
    (line,) = job_errors(path)
    assert line.startswith(f"{path}: cannot parse YAML at line 1, column 7: ")
    assert "python/object" in line


# ---------------------------------------------------------------------------------------------
# JSON schema
# ---------------------------------------------------------------------------------------------


def _properties(node: Any, where: str = "#") -> list[tuple[str, dict[str, Any]]]:
    """Every (location, property schema) under every ``properties`` of a schema tree."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        for key, prop in node.get("properties", {}).items():
            found.append((f"{where}/properties/{key}", prop))
        for key, child in node.items():
            found += _properties(child, f"{where}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            found += _properties(child, f"{where}/{i}")
    return found


def test_json_schema_describes_every_property_of_every_definition() -> None:
    schema = json_schema()
    props = _properties(schema)
    assert {where.split("/")[2] for where, _ in props} >= {"PredictJob", "InputSpec", "TilingSpec"}
    undocumented = [where for where, prop in props if not prop.get("description")]
    assert undocumented == []


def test_json_schema_has_discriminated_one_of_over_job_kinds() -> None:
    schema = json_schema()
    assert schema["discriminator"]["propertyName"] == "kind"
    assert set(schema["discriminator"]["mapping"]) == set(JOB_KINDS)
    assert schema["oneOf"] == [{"$ref": "#/$defs/PredictJob"}, {"$ref": "#/$defs/TrainJob"}]


def test_json_schema_accepts_a_sample_job() -> None:
    sample = job(tiling={"tile": 256, "stitch": "blend"}, output={"probabilities": "uint8"})
    jsonschema.Draft202012Validator(json_schema()).validate(sample)


def test_json_schema_rejects_an_unknown_key() -> None:
    validator = jsonschema.Draft202012Validator(json_schema())
    assert not validator.is_valid(job(tiling={"tilee": 256}))


# ---------------------------------------------------------------------------------------------
# The shipped jobs
# ---------------------------------------------------------------------------------------------


def test_every_shipped_job_validates(tmp_path: Path) -> None:
    import shutil

    import torch

    from tilewise import models
    from tilewise.packages import save_package

    jobs = tmp_path / "jobs"
    shutil.copytree(JOBS_DIR, jobs)
    # The demo's predict job names the package its train job writes: make that package from
    # the train job's own model section, where the train job would put it.
    train = load_job(jobs / "ihc-train.yaml")
    assert isinstance(train, TrainJob)
    demo = yaml.safe_load((jobs / "ihc-demo.yaml").read_text())
    assert resolve_location(demo["model"]["package"], jobs) == train.package_location
    m = train.model
    torch.manual_seed(0)
    net = models.create(m.arch, in_channels=3, num_classes=m.num_classes, **m.args)
    save_package(train.package_location, net.state_dict(), arch=m.arch, args=m.args,
                 in_channels=3, num_classes=m.num_classes, class_names=m.class_names,
                 normalize=train.normalize.model_dump(mode="json"))  # fmt: skip
    files = sorted(jobs.glob("*.yaml"))
    assert files, f"no job files in {JOBS_DIR}"
    assert validate_files(files) == {str(f): [] for f in files}


# ---------------------------------------------------------------------------------------------
# Sliding windows, flip averaging, ensembles
# ---------------------------------------------------------------------------------------------


def test_sliding_job_for_pspnet_loads(tmp_path: Path) -> None:
    data = job(
        model={"arch": "pspnet50", "num_classes": 21, "args": {"width": 0.0625}},
        tiling={"tile": 473, "stitch": "sliding", "flip": True},
    )
    loaded = load_job(write(tmp_path, data))
    assert (loaded.tiling.stitch, loaded.tiling.step, loaded.tiling.flip) == ("sliding", None, True)


@pytest.mark.parametrize(
    ("tiling", "field", "text"),
    [
        ({"tile": 473, "stitch": "sliding", "halo": 32}, "halo", "halo has no meaning"),
        ({"tile": 470, "stitch": "sliding"}, "tile", "Use tile: 465 or 473"),
        ({"tile": 473, "stitch": "sliding", "step": 600}, "step", "Use step: 316"),
        ({"tile": 472, "stitch": "crop", "flip": True}, "step", "belong to stitch: sliding"),
        ({"tile": 472, "stitch": "crop"}, "stitch", "Use stitch: blend"),
    ],
    ids=["halo", "window-size", "step", "flip-without-sliding", "crop-global-pooling"],
)
def test_sliding_rules_are_reported_at_their_field(
    tmp_path: Path, tiling: dict[str, Any], field: str, text: str
) -> None:
    data = job(model={"arch": "pspnet50", "num_classes": 21}, tiling=tiling)
    (line,) = errors_of(tmp_path, data)
    assert f": tiling.{field}: " in line and text in line


def test_flip_tta_keeps_the_exact_halo(tmp_path: Path) -> None:
    loaded = load_job(write(tmp_path, job(model={"tta": "flip"}, tiling={"tile": 384})))
    assert loaded.model.tta == "flip"


def test_ensemble_member_weights_resolve_against_the_job_file(tmp_path: Path) -> None:
    members = [
        {"arch": "unet", "weights": "a.safetensors"},
        {"arch": "unet", "args": {"dropout": 0}},
    ]
    data = job(model={"arch": "ensemble", "args": {"members": members}})
    path = write(tmp_path / "jobs", data)
    (line,) = job_errors(path)  # checked before any work: the member's file is missing
    assert "members[0].weights" in line and "does not exist" in line
    (tmp_path / "jobs" / "a.safetensors").write_bytes(b"")
    loaded = load_job(path)
    first, second = loaded.model.args["members"]
    assert first["weights"] == str(tmp_path / "jobs" / "a.safetensors")
    assert "weights" not in second
