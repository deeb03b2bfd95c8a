"""Export an hf-text model folder as a plain transformers `AutoModelForSequenceClassification`.

Allowed only where a transformers class computes exactly what tl-ray's `TextClassifier`
does: `[CLS]` through the encoder's pooler, dropout, one Linear head; that is
`BertForSequenceClassification` (and classes built the same way, e.g. ALBERT's). LoRA
adapters are merged into the encoder first. Mean pooling, an encoder without a pooler
(tl-ray then classifies the raw [CLS] state) or a class whose head has more layers
(RoBERTa, ELECTRA, DistilBERT) are refused in one line that points to `--format onnx`.

The folder holds `config.json` (with `id2label`/`label2id` from labels.json), the weights
and the tokenizer (its `model_max_length` is the checkpoint's `max_length`). Before it is
published it is loaded back with `from_pretrained`, and its logits must match tl-ray's
within 1e-5 on a padded batch.

Example:
    >>> export_hf("runs/demo/model", "exports/demo-hf")  # doctest: +SKIP
    PosixPath('/.../exports/demo-hf')
    >>> from transformers import pipeline                  # doctest: +SKIP
    >>> pipeline("text-classification", model="exports/demo-hf", top_k=None)("a fine film")  # doctest: +SKIP
    [{'label': 'pos', 'score': 0.93}, {'label': 'neg', 'score': 0.07}]
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from tl_ray.errors import BackboneError, CheckpointError
from tl_ray.export.formats import publish

__all__ = ["TOLERANCE", "export_hf", "write_hf"]

TOLERANCE = 1e-5  # max |logit difference| to tl-ray, relative to the largest logit (at least 1)
_USE_ONNX = "export it with --format onnx (one graph of the whole model)"


def export_hf(model_folder: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write the transformers folder of hf-text checkpoint `model_folder` to `out_dir`."""
    return publish(model_folder, out_dir, "hf", write_hf, force=force)


def write_hf(source: Path, folder: Path) -> Path:
    """Create `folder` (new) with the sequence-classification model of `source`, checked."""
    import torch
    from transformers.utils import logging as transformers_logging

    from tl_ray.export.graphs import EXAMPLE_TEXTS
    from tl_ray.train.checkpoint import load_model_folder

    transformers_logging.disable_progress_bar()  # a bar per save and load
    backbone, model, labels, manifest = load_model_folder(source)
    model.eval()
    if model.pooling != "cls":
        raise BackboneError(f"{source} pools by {model.pooling} over the tokens, which no "
                            f"transformers class does: {_USE_ONNX}")  # fmt: skip
    max_length = int(manifest.get("max_length", 128))
    inputs = backbone.preprocess(EXAMPLE_TEXTS, max_length)
    with torch.no_grad():
        expected = model(**inputs)  # before any merge: the check covers the merge too
    encoder = _merged(model.encoder)
    if getattr(encoder, "pooler", None) is None:
        raise BackboneError(f"{source} classifies the raw [CLS] hidden state ({type(encoder).__name__} "
                            f"has no pooler), which no transformers class does: {_USE_ONNX}")  # fmt: skip
    classifier = _sequence_classifier(encoder, model.classifier, labels.labels, backbone.cfg.head_dropout)
    classifier.save_pretrained(str(folder))
    tokenizer = backbone.tokenizer
    tokenizer.model_max_length = max_length  # `truncation=True` then cuts where tl-ray does
    tokenizer.save_pretrained(str(folder))
    _check_matches(folder, inputs, expected, source)
    return folder


def _merged(encoder: Any) -> Any:
    """The encoder with peft's LoRA adapters folded into its weights (as it is otherwise)."""
    import warnings

    if not hasattr(encoder, "merge_and_unload"):
        return encoder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about its internals while merging
        return encoder.merge_and_unload()


def _sequence_classifier(encoder: Any, head: Any, labels: list[str], dropout: float) -> Any:
    """`AutoModelForSequenceClassification` for the encoder's config, holding its weights."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(encoder.config)
    config.architectures = None  # save_pretrained fills in the class it saves
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.problem_type = "single_label_classification"
    config.classifier_dropout = dropout  # what tl-ray trained with (used only in train mode)
    name = f"{config.model_type} models"
    with torch.random.fork_rng(devices=[]):  # from_config draws weights we then replace
        try:
            model = AutoModelForSequenceClassification.from_config(config)
        except ValueError:
            raise BackboneError(f"transformers has no sequence-classification class for {name}: "
                                f"{_USE_ONNX}") from None  # fmt: skip
    base, linear = model.base_model, getattr(model, "classifier", None)
    if type(base) is not type(encoder) or not isinstance(linear, torch.nn.Linear):
        raise BackboneError(f"{type(model).__name__} puts a different head on {name} than tl-ray's "
                            f"pooler -> dropout -> Linear: {_USE_ONNX}")  # fmt: skip
    base.load_state_dict(encoder.state_dict())
    linear.load_state_dict(head.state_dict())
    return model.eval()


def _check_matches(folder: Path, inputs: dict, expected: Any, source: Path) -> None:
    """The saved folder, loaded as users load it, must give tl-ray's logits."""
    import torch
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        got = loaded(**inputs).logits
    worst = float((got - expected).abs().max())
    if worst > TOLERANCE * max(1.0, float(expected.abs().max())):
        raise CheckpointError(f"the transformers export of {source} does not match tl-ray: max "
                              f"|logit difference| {worst:.2e} > {TOLERANCE:g}; {_USE_ONNX}")  # fmt: skip
