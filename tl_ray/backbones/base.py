"""The Backbone contract every PyTorch backbone family implements.

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
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Backbone", "NO_DECAY_MARKERS"]

# Parameter-name fragments that conventionally get no weight decay (biases and norms).
NO_DECAY_MARKERS = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


class Backbone(ABC):
    """A pretrained network family that can be built, partially unfrozen, saved and loaded."""

    kind: ClassVar[str] = ""

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
    def apply_unfreeze(self, model: "nn.Module") -> None:
        """Set `requires_grad` so that only the configured top layers and the head train."""

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

    def logits(self, model: "nn.Module", inputs: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """Class scores for a preprocessed batch."""
        return model(**inputs)

    def param_groups(
        self, model: "nn.Module", lr: float, weight_decay: float, lr_decay: float = 1.0
    ) -> list[dict[str, Any]]:
        """AdamW parameter groups of the trainable parameters.

        Layer d below the head (see `layer_of`) gets `lr * lr_decay**d`; biases and norm
        weights get no weight decay.
        """
        groups: dict[tuple[int, bool], list] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = any(marker in name for marker in NO_DECAY_MARKERS)
            groups.setdefault((self.layer_of(name), no_decay), []).append(param)
        return [
            {
                "params": params,
                "lr": lr * lr_decay**depth,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
            for (depth, no_decay), params in sorted(groups.items(), key=lambda kv: kv[0])
        ]
