"""One registry of backbone families, filled by the @register decorator."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, TypeVar

from tl_ray.errors import BackboneError
from tl_ray.extras import require

if TYPE_CHECKING:
    from tl_ray.backbones.base import Backbone

__all__ = ["get_backbone", "register", "registered_kinds"]

_REGISTRY: dict[str, type["Backbone"]] = {}
# kind -> module that registers it; imported on first use so heavy libraries load lazily.
_MODULES = {
    "hf-text": "tl_ray.backbones.hf_text",
    "keras-image": "tl_ray.backbones.keras_image",
    "word-vectors": "tl_ray.backbones.word_vectors",
}
# kind -> the pip extra its module needs to build, train and load a model (word-vectors needs
# gensim only to read a vectors file: see word_vectors_io; its checkpoints load without it).
_EXTRA_OF_KIND = {"hf-text": "text", "keras-image": "keras"}

B = TypeVar("B", bound="type[Backbone]")


def register(kind: str) -> Callable[[B], B]:
    """Class decorator: make a Backbone subclass available under `kind`.

    >>> @register("my-family")          # doctest: +SKIP
    ... class MyBackbone(Backbone): ...
    """

    def decorate(cls: B) -> B:
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise BackboneError(
                f"backbone kind '{kind}' is already registered by {_REGISTRY[kind].__name__}; "
                f"registered kinds: {', '.join(sorted(_REGISTRY))}"
            )
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return decorate


def registered_kinds() -> list[str]:
    """All kinds tl-ray knows, whether or not their module is imported yet."""
    return sorted(set(_MODULES) | set(_REGISTRY))


def get_backbone(cfg: Any) -> "Backbone":
    """Instantiate the backbone family named by `cfg.kind` with its config."""
    kind = getattr(cfg, "kind", None)
    if kind in _EXTRA_OF_KIND:
        require(_EXTRA_OF_KIND[kind], f"backbone kind {kind}")  # one line naming the extra
    if kind not in _REGISTRY and kind in _MODULES:
        import importlib

        importlib.import_module(_MODULES[kind])
    if kind not in _REGISTRY:
        raise BackboneError(
            f"unknown backbone kind {kind!r}; valid kinds: {', '.join(registered_kinds())}"
        )
    return _REGISTRY[kind](cfg)
