"""The Backbone contract every backbone family implements (PyTorch by default; a TensorFlow
family such as keras-image overrides the framework hooks `logits`, `scores`,
`trainable_names` and `parameter_names`).

A backbone turns a pretrained network into a classifier and decides which of its
parameters train at a given unfreeze depth. It never imports Ray.

Example:
    >>> backbone = get_backbone(HFTextConfig(name_or_path="minilm", unfreeze_depth=2))  # doctest: +SKIP
    >>> model = backbone.build(num_labels=2)                                            # doctest: +SKIP
    >>> backbone.apply_unfreeze(model)                                                  # doctest: +SKIP
    >>> logits = backbone.logits(model, backbone.preprocess(["great film"], 64))        # doctest: +SKIP
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

from tl_ray import unfreeze
from tl_ray.errors import BackboneError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

__all__ = ["Backbone", "NO_DECAY_MARKERS"]

# Parameter-name fragments that conventionally get no weight decay (biases and norms).
NO_DECAY_MARKERS = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


class Backbone(ABC):
    """A pretrained network family that can be built, partially unfrozen, saved and loaded."""

    kind: ClassVar[str] = ""
    input_kind: ClassVar[str] = "text"  # what `preprocess` takes: "text" (str) or "image" (bytes)
    framework: ClassVar[str] = "torch"  # "torch" or "tensorflow": which trainer and loop run it

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @abstractmethod
    def num_layers(self) -> int:
        """How many unfreezable layers the backbone has (the maximum unfreeze depth)."""

    def check(self) -> None:
        """Raise BackboneError now if this config cannot work; cheap, loads no weights."""
        self.num_layers()

    @abstractmethod
    def build(self, num_labels: int) -> "nn.Module":
        """The pretrained network with a new head of `num_labels` outputs."""

    @abstractmethod
    def apply_unfreeze(self, model: "nn.Module", depth: int | None = None) -> None:
        """Set `requires_grad` so that only the top `depth` layers and the head train
        (None: the depth at epoch 1, i.e. `unfreeze_depth` when there is no schedule)."""

    # -- the unfreeze schedule (tl_ray/unfreeze.py): the depth in force at each epoch
    def base_depth(self) -> int:
        """The depth before the schedule's first step: `unfreeze_depth`, or 0 when it is None."""
        depth = getattr(self.cfg, "unfreeze_depth", None)
        return 0 if depth is None else depth

    def depth_at(self, epoch: int) -> int:
        """The unfreeze depth in force at `epoch` (1-based, as the epoch metric counts)."""
        schedule = getattr(self.cfg, "unfreeze_schedule", None)
        if schedule is None:
            return self.base_depth()
        depth = unfreeze.depth_at(schedule, epoch, base=self.base_depth(), layers=self.num_layers())
        return self.base_depth() if depth is None else depth

    def check_schedule(self, name: str = "") -> None:
        """BackboneError when a step of the schedule is deeper than the layer count."""
        schedule, layers = getattr(self.cfg, "unfreeze_schedule", None), self.num_layers()
        for epoch, depth in schedule if isinstance(schedule, list) else ():
            if depth > layers:
                raise BackboneError(f"backbone.unfreeze_schedule: depth {depth} at epoch {epoch} must "
                                    f"be between 0 and {layers}{name} ({layers} layers)")

    @abstractmethod
    def layer_of(self, name: str) -> int:
        """Depth index of a parameter for learning-rate decay: 0 = head, 1 = top layer, ..."""

    @abstractmethod
    def preprocess(self, texts: list[str], max_length: int) -> dict[str, "torch.Tensor"]:
        """Turn raw inputs into the tensors `logits` expects."""

    @abstractmethod
    def save(self, model: "nn.Module", folder: Path) -> None:
        """Write weights and preprocessing assets (tokenizer, vocabulary) into `folder`."""

    @abstractmethod
    def load(self, folder: Path, num_labels: int, trainable: bool = False) -> "nn.Module":
        """Rebuild the model saved by `save` (trainable=True keeps adapters trainable)."""

    # -- optional: an exact cache of what the frozen bottom computes (issue: shallow tuning)
    def prefix_cache(self) -> str | None:
        """Where the frozen, deterministic bottom ends (a cache-key part), or None: no cache.

        A family that returns a boundary implements `frozen_features`, and its model accepts
        those features in place of the raw inputs, giving the same logits.
        """
        return None

    def fingerprint(self) -> dict[str, str]:
        """Identity of the pretrained weights and preprocessing, for the cache key."""
        return {}

    def frozen_features(
        self, model: "nn.Module", inputs: dict[str, "torch.Tensor"]
    ) -> dict[str, "torch.Tensor"]:
        """The frozen bottom's output for a preprocessed batch (`attention_mask`: per-token)."""
        raise NotImplementedError(f"{type(self).__name__} has no frozen-prefix cache")

    def logits(self, model: "nn.Module", inputs: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """Class scores for a preprocessed batch."""
        return model(**inputs)

    def scores(self, model: Any, inputs: Any) -> "np.ndarray":
        """Class scores for a preprocessed batch as a float32 NumPy array (inference mode).

        `preprocess` makes CPU tensors; they move onto the device of the model's first
        parameter (a GPU when the model was moved there) before the forward pass.
        """
        import torch

        parameter = next(model.parameters(), None)
        if parameter is not None:
            inputs = {key: value.to(parameter.device) if isinstance(value, torch.Tensor) else value
                      for key, value in inputs.items()}  # fmt: skip
        with torch.no_grad():
            return self.logits(model, inputs).float().cpu().numpy()

    def trainable_names(self, model: Any) -> set[str]:
        """Names of the parameters that train now (after `apply_unfreeze`)."""
        return {name for name, param in model.named_parameters() if param.requires_grad}

    def parameter_names(self, model: Any) -> set[str]:
        """Names of every parameter that full-depth fine-tuning trains."""
        return {name for name, _ in model.named_parameters()}

    def is_head(self, name: str) -> bool:
        """Whether parameter `name` belongs to the new classification head (`train.head_lr`)."""
        return name.startswith("classifier.")

    def param_groups(
        self, model: "nn.Module", lr: float, weight_decay: float, lr_decay: float = 1.0,
        head_lr: float | None = None, exclude: Iterable["torch.Tensor"] = (),
    ) -> list[dict[str, Any]]:
        """AdamW parameter groups of the trainable parameters (less those in `exclude`: the
        ones an optimizer holds already, when a schedule unfreezes more).

        Layer d below the head (see `layer_of`) gets `lr * lr_decay**d`; biases and norm
        weights get no weight decay. With `head_lr`, the head's parameters (`is_head`) form
        their own groups, first, at `head_lr`.
        """
        held = {id(param) for param in exclude}
        groups: dict[tuple[int, bool], list] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad or id(param) in held:
                continue
            no_decay = any(marker in name for marker in NO_DECAY_MARKERS)
            depth = -1 if head_lr is not None and self.is_head(name) else self.layer_of(name)
            groups.setdefault((depth, no_decay), []).append(param)
        return [
            {
                "params": params,
                "lr": head_lr if depth == -1 else lr * lr_decay**depth,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
            for (depth, no_decay), params in sorted(groups.items(), key=lambda kv: kv[0])
        ]
