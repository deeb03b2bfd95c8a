"""Optional libraries: which pip extra brings each, and one line naming it when it is missing.

The core install (Ray, torch, Optuna, pyarrow) runs search, serving and the CLI; each backbone
family's library comes with an extra (pyproject.toml), so a text-only install has no
TensorFlow or gensim. Looking a module up with `find_spec` imports nothing.

Example:
    >>> require("word-vectors", "tl-ray w2v")   # doctest: +SKIP
    tl_ray.errors.BackboneError: tl-ray w2v needs gensim: pip install 'tl-ray[word-vectors]'
"""

from __future__ import annotations

import importlib.util

from tl_ray.errors import BackboneError

__all__ = ["EXTRAS", "require"]

# extra -> (top-level modules it provides, what to call them, how to install them)
EXTRAS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "text": (("transformers", "peft"), "transformers and peft", "pip install 'tl-ray[text]'"),
    "keras": (
        ("tensorflow", "tf_keras"),
        "TensorFlow",
        "pip install 'tl-ray[keras]' (or 'tl-ray[keras-gpu]' on GPU nodes)",
    ),
    "word-vectors": (("gensim",), "gensim", "pip install 'tl-ray[word-vectors]'"),
}


def require(extra: str, user: str) -> None:
    """Raise BackboneError naming `extra` if any module it provides cannot be imported."""
    modules, name, install = EXTRAS[extra]
    if any(importlib.util.find_spec(module) is None for module in modules):
        raise BackboneError(f"{user} needs {name}: {install}")
