"""Networks in plain torch and the registry of their tiling facts.

This package never imports ray or zarr. Families are listed explicitly below (no star-import
discovery): adding a family is one file plus one line here.
"""

from tilewise.models import unet as _unet  # noqa: F401  (registers unet, unet_same)
from tilewise.models.registry import (
    ModelEntry,
    SizeRule,
    TilingFacts,
    create,
    entry,
    facts,
    names,
    register_model,
)

__all__ = [
    "ModelEntry",
    "SizeRule",
    "TilingFacts",
    "create",
    "entry",
    "facts",
    "names",
    "register_model",
]
