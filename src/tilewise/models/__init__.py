"""Networks in plain torch and the registry of their tiling facts.

This package never imports ray or zarr. Families are listed explicitly below (no star-import
discovery): adding a family is one file plus one line here.
"""

# One line per family; each import registers the family's architectures.
from tilewise.models import deconvnet as _deconvnet  # noqa: F401
from tilewise.models import deeplab as _deeplab  # noqa: F401
from tilewise.models import densenet as _densenet  # noqa: F401
from tilewise.models import dilation as _dilation  # noqa: F401
from tilewise.models import ensemble as _ensemble  # noqa: F401  (after the members' families)
from tilewise.models import fcn as _fcn  # noqa: F401
from tilewise.models import fusionnet as _fusionnet  # noqa: F401
from tilewise.models import pspnet as _pspnet  # noqa: F401
from tilewise.models import segnet as _segnet  # noqa: F401
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
