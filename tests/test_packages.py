"""Model packages: written, read back, named by predict jobs, and refused when they disagree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
import zarr

from tests.conftest import write_input
from tests.reference import whole_image
from tilewise import models
from tilewise.errors import ConfigError, OutputExistsError
from tilewise.packages import MANIFEST, WEIGHTS, load_manifest, save_package
from tilewise.pipeline.job import build_model, prepare
from tilewise.spec import job_errors, parse_job

ARGS = {"depth": 2, "base_width": 4}
NORMALIZE = {"scale": 0.004, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


def _trained(seed: int = 7) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create("unet_same", in_channels=3, num_classes=3, **ARGS)


def _package(tmp_path: Path, **extra: Any) -> Path:
    where = tmp_path / "pkg"
    save_package(
        str(where),
        _trained().state_dict(),
        arch="unet_same",
        args=ARGS,
        in_channels=3,
        num_classes=3,
        class_names=["background", "stroma", "nuclei"],
        normalize=NORMALIZE,
        training={"run": "test", "step": 12},
        **extra,
    )
    return where


def _job(tmp_path: Path, model: dict[str, Any], **input_extra: Any) -> dict[str, Any]:
    return {
        "kind": "predict",
        "input": {"path": str(tmp_path / "in.zarr"), **input_extra},
        "model": model,
        "tiling": {"tile": 32, "batch_size": 2},
        "output": {"path": str(tmp_path / "out.zarr"), "labels": "uint8", "chunk": 64},
    }


def _errors(tmp_path: Path, job: dict[str, Any]) -> list[str]:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return job_errors(path)


def test_package_is_a_manifest_and_safetensors_weights(tmp_path: Path) -> None:
    where = _package(tmp_path)
    assert sorted(p.name for p in where.iterdir()) == sorted([MANIFEST, WEIGHTS])
    manifest = load_manifest(str(where))
    assert (manifest.arch, manifest.num_classes, manifest.in_channels) == ("unet_same", 3, 3)
    assert manifest.halo == models.facts("unet_same", in_channels=3, num_classes=3, **ARGS).halo
    assert manifest.training == {"run": "test", "step": 12}
    from safetensors.torch import load_file

    saved = load_file(str(where / WEIGHTS))
    for key, value in _trained().state_dict().items():
        assert torch.equal(saved[key], value)
    # nothing temporary is left next to it
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


def test_a_job_naming_only_the_package_gets_its_network_classes_and_normalisation(
    tmp_path: Path,
) -> None:
    where = _package(tmp_path)
    write_input(tmp_path / "in.zarr")
    job = parse_job(_job(tmp_path, {"package": str(where)}))
    assert job.model.arch == "unet_same" and job.model.args == ARGS
    assert job.model.class_names == ["background", "stroma", "nuclei"]
    assert job.model.weights == str(where / WEIGHTS)
    assert job.input.normalize.mean == NORMALIZE["mean"]
    prepared = prepare(job)
    net = build_model(job, prepared.in_channels)
    # the same scores as the trained network itself, normalised by hand (independent path)
    image = zarr.open_array(tmp_path / "in.zarr", mode="r")[:].astype(np.float32)
    mean = np.array(NORMALIZE["mean"], np.float32)[:, None, None]
    std = np.array(NORMALIZE["std"], np.float32)[:, None, None]
    x = (image * np.float32(NORMALIZE["scale"]) - mean) / std
    trained = _trained().eval()
    expected = whole_image(trained, x, trained.tiling)
    got = whole_image(net, x, trained.tiling)
    assert np.array_equal(got, expected)
    t = torch.from_numpy(image)
    assert torch.allclose(prepared.normalizer(t.clone()), torch.from_numpy(x), atol=1e-6)


def test_a_job_may_repeat_what_the_package_says(tmp_path: Path) -> None:
    where = _package(tmp_path)
    model = {"package": str(where), "arch": "unet_same", "num_classes": 3, "args": ARGS}
    assert _errors(tmp_path, _job(tmp_path, model, normalize=NORMALIZE)) == []
    # what every actor does: validate the driver's validated job again
    job = parse_job(_job(tmp_path, {"package": str(where)}))
    assert parse_job(job.model_dump(mode="json")) == job


@pytest.mark.parametrize(
    ("model", "field", "words"),
    [
        ({"arch": "fcn8s"}, "model.arch", "holds a network with arch 'unet_same'"),
        ({"num_classes": 2}, "model.num_classes", "num_classes 3; got 2"),
        ({"class_names": ["a", "b", "c"]}, "model.class_names", "class_names"),
        ({"args": {"depth": 3}}, "model.args", "Remove model.args"),
        ({"weights": "other.safetensors"}, "model.weights", "not both"),
    ],
)
def test_a_job_that_disagrees_with_its_package_is_refused(
    tmp_path: Path, model: dict[str, Any], field: str, words: str
) -> None:
    where = _package(tmp_path)
    errors = _errors(tmp_path, _job(tmp_path, {"package": str(where), **model}))
    assert len(errors) == 1 and f": {field}: " in errors[0] and words in errors[0], errors


def test_other_normalisation_than_the_package_is_refused(tmp_path: Path) -> None:
    where = _package(tmp_path)
    job = _job(tmp_path, {"package": str(where)}, normalize={"scale": "auto"})
    errors = _errors(tmp_path, job)
    assert len(errors) == 1 and ": input.normalize: " in errors[0], errors
    assert "Remove input.normalize" in errors[0]


def test_not_a_package_and_broken_manifests_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    errors = _errors(tmp_path, _job(tmp_path, {"package": str(tmp_path / "empty")}))
    assert len(errors) == 1 and "model.package" in errors[0] and "no model.yaml" in errors[0]
    where = _package(tmp_path)
    text = (where / MANIFEST).read_text()
    (where / MANIFEST).write_text(text.replace("halo: ", "halo: 1"))  # a wrong halo
    with pytest.raises(ConfigError, match="builds that network with halo"):
        load_manifest(str(where))
    (where / MANIFEST).write_text("format: something-else\n")
    with pytest.raises(ConfigError, match="not a tilewise model manifest"):
        load_manifest(str(where))
    (where / MANIFEST).write_text(text.replace("arch: unet_same", "arch: unet_sam"))
    with pytest.raises(ConfigError, match="unet_sam"):
        load_manifest(str(where))


def test_an_existing_package_is_kept_unless_overwritten(tmp_path: Path) -> None:
    where = _package(tmp_path)
    before = (where / WEIGHTS).read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        save_package(str(where), _trained(8).state_dict(), arch="unet_same", args=ARGS,
                     in_channels=3, num_classes=3)  # fmt: skip
    assert (where / WEIGHTS).read_bytes() == before
    save_package(str(where), _trained(8).state_dict(), arch="unet_same", args=ARGS,
                 in_channels=3, num_classes=3, overwrite=True)  # fmt: skip
    assert (where / WEIGHTS).read_bytes() != before
    assert load_manifest(str(where)).class_names is None


def test_packages_at_fsspec_urls(tmp_path: Path) -> None:
    location = "memory://tw-test-packages/pkg"
    save_package(location, _trained().state_dict(), arch="unet_same", args=ARGS, in_channels=3,
                 num_classes=3, normalize=NORMALIZE)  # fmt: skip
    write_input(tmp_path / "in.zarr")
    job = parse_job(_job(tmp_path, {"package": location}))
    net = build_model(job, 3)
    for key, value in _trained().state_dict().items():
        assert torch.equal(net.state_dict()[key], value)
    with pytest.raises(OutputExistsError):
        save_package(location, _trained().state_dict(), arch="unet_same", args=ARGS,
                     in_channels=3, num_classes=3)  # fmt: skip
