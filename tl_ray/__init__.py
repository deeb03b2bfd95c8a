"""tl-ray: transfer learning at cluster scale on Ray.

Importing `tl_ray` loads no torch, TensorFlow or gensim; the heavy parts import on use.

Example:
    >>> from tl_ray import load_config
    >>> cfg = load_config("examples/minilm-sentiment.yaml")  # doctest: +SKIP
"""

from tl_ray.config import RunConfig, load_config
from tl_ray.errors import BackboneError, CheckpointError, ConfigError, DataError, TLRayError

__all__ = [
    "BackboneError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "RunConfig",
    "TLRayError",
    "load_config",
]
__version__ = "0.1.0"
