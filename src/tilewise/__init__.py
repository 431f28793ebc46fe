"""tilewise: seamless overlap-tile segmentation of images too large for one machine.

Public API: :func:`predict_array` (in-process, the same engine as the Ray workers) and the model
registry in :mod:`tilewise.models` (``create``, ``names``, ``facts``).
"""

from tilewise.pipeline.api import predict_array

__all__ = ["predict_array"]
__version__ = "0.1.0"
