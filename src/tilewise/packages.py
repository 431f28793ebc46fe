"""Model packages: a trained network as a folder that predict jobs name (``model.package``).

A package is a directory (local or any fsspec URI) holding

- ``model.yaml``: the architecture and its arguments, the input channels, the classes and their
  names, the input normalisation the network was trained with, its halo (as a check that this
  tilewise builds the same network) and free-form provenance (the training run);
- ``weights.safetensors``: the state dict. safetensors holds tensors only, so reading a package
  never unpickles anything.

``model.yaml`` is written last, so a folder without it is not (yet) a package. Locally the whole
folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tilewise.errors import ConfigError, OutputExistsError, UnknownArchitectureError

__all__ = ["MANIFEST", "WEIGHTS", "PackageManifest", "load_manifest", "save_package"]

MANIFEST = "model.yaml"
WEIGHTS = "weights.safetensors"
FORMAT = "tilewise-model"


class PackageManifest(BaseModel):
    """The contents of ``model.yaml``."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["tilewise-model"] = "tilewise-model"
    version: Literal[1] = 1
    arch: str
    args: dict[str, Any] = Field(default_factory=dict)
    in_channels: int = Field(ge=1)
    num_classes: int = Field(ge=1)
    class_names: list[str] | None = None
    normalize: dict[str, Any] = Field(
        default_factory=dict, description="The NormalizeSpec the network was trained with."
    )
    halo: int | None = Field(
        ge=0,
        description="The network's exact halo when the package was made (null: none is finite).",
    )
    weights: str = WEIGHTS
    created_by: str = ""
    training: dict[str, Any] | None = None

    def weights_location(self, package: str) -> str:
        """Where the package's weights file is."""
        return _join(package, self.weights)


def _join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}"


def _is_url(location: str) -> bool:
    return "://" in location or "::" in location


def _halo(arch: str, args: dict[str, Any], in_channels: int, num_classes: int) -> int | None:
    from tilewise.models import facts
    from tilewise.models.maskrcnn import is_instance_arch

    if is_instance_arch(arch):  # an instance network has no halo: the instance stage's is set
        return None
    return facts(arch, in_channels=in_channels, num_classes=num_classes, **args).halo


def load_manifest(location: str, storage_options: dict[str, Any] | None = None) -> PackageManifest:
    """Read and check a package's ``model.yaml``.

    Raises:
        ConfigError: no package there, an unreadable or invalid manifest, an architecture this
            tilewise does not have, or a network whose halo differs from the one recorded (the
            package was made by a tilewise that builds this architecture differently).
    """
    import fsspec

    path = _join(location, MANIFEST)
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ConfigError(
            f"'{location}' is not a model package: it has no {MANIFEST}. A package is the folder "
            f"a training job writes (model.yaml + {WEIGHTS}); check the path."
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"'{path}' is a folder; a package's {MANIFEST} is a YAML file.") from None
    except OSError as exc:
        raise ConfigError(f"cannot read '{path}': {exc}") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"'{path}' is not valid YAML ({str(exc).splitlines()[0]}).") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(
            f"'{path}' is not a tilewise model manifest (format: {FORMAT} missing); got "
            f"{type(data).__name__ if not isinstance(data, dict) else data.get('format')!r}."
        )
    try:
        manifest = PackageManifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"'{path}' is invalid: {where}: {first['msg']}.") from None
    try:
        halo = _halo(manifest.arch, manifest.args, manifest.in_channels, manifest.num_classes)
    except UnknownArchitectureError as exc:
        raise ConfigError(f"package '{location}': {exc}") from None
    if halo != manifest.halo:
        raise ConfigError(
            f"package '{location}' records halo {manifest.halo} for {manifest.arch} "
            f"{manifest.args}, but this tilewise builds that network with halo {halo}: it was "
            f"made by a version that defines the architecture differently. Re-export it with "
            f"this version."
        )
    return manifest


def save_package(
    location: str,
    state_dict: dict[str, Any],
    *,
    arch: str,
    in_channels: int,
    num_classes: int,
    args: dict[str, Any] | None = None,
    class_names: list[str] | None = None,
    normalize: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> PackageManifest:
    """Write a model package (weights first, ``model.yaml`` last).

    Args:
        location: the package folder (local path or fsspec URI).
        state_dict: the network's weights (``model.state_dict()``).
        arch, in_channels, num_classes, args: how to build the network (``models.create``).
        class_names: one name per class.
        normalize: the input normalisation the network was trained with (a NormalizeSpec as a
            mapping: scale, mean, std).
        training: provenance (run name, step, metrics), stored as given.
        overwrite: replace an existing package.

    Returns:
        The manifest written.
    """
    from safetensors.torch import save as save_tensors

    from tilewise import __version__

    args = dict(args or {})
    if class_names is not None and len(class_names) != num_classes:
        raise ConfigError(
            f"class_names must have one name per class ({num_classes}); got {len(class_names)}."
        )
    manifest = PackageManifest(
        arch=arch,
        args=args,
        in_channels=in_channels,
        num_classes=num_classes,
        class_names=class_names,
        normalize=dict(normalize or {}),
        halo=_halo(arch, args, in_channels, num_classes),
        created_by=f"tilewise {__version__}",
        training=training,
    )
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    blob = save_tensors(tensors)
    text = yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False).encode()
    if _is_url(location):
        _save_remote(location, blob, text, overwrite, storage_options)
    else:
        _save_local(location, blob, text, overwrite)
    return manifest


def _save_local(location: str, blob: bytes, text: bytes, overwrite: bool) -> None:
    final = Path(location)
    if final.exists() and not overwrite:
        raise OutputExistsError(
            f"model package '{location}' already exists; choose another path or pass "
            f"overwrite=True to replace it."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed: a crash never leaves a half package behind.
    temp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.partial"
    temp.mkdir()
    try:
        (temp / WEIGHTS).write_bytes(blob)
        (temp / MANIFEST).write_bytes(text)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _save_remote(
    location: str, blob: bytes, text: bytes, overwrite: bool, options: dict[str, Any] | None
) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(location, **(options or {}))
    manifest = _join(path, MANIFEST)
    if fs.exists(manifest) and not overwrite:
        raise OutputExistsError(
            f"model package '{location}' already exists; choose another path or pass "
            f"overwrite=True to replace it."
        )
    if fs.exists(manifest):
        fs.rm(manifest)  # no longer a package until the new manifest lands
    fs.makedirs(path, exist_ok=True)
    with fs.open(_join(path, WEIGHTS), "wb") as fh:
        fh.write(blob)
    with fs.open(manifest, "wb") as fh:
        fh.write(text)
