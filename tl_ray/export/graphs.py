"""Export-ready views of the torch classifiers: same weights, same logits, no shape branches.

`torch.export` (under `torch.onnx.export(dynamo=True)`) traces one graph for every batch and
length, so each view computes what the model's own eval-mode forward computes without Python
branches on tensor sizes or packed sequences:

- hf-text: `TextClassifier` as it is (LoRA adapters merged into the encoder first).
- word-vectors: the CNN input is always zero-padded by `max(filters) - 1` steps (the model
  pads only batches shorter than its widest filter; windows past a text's span are masked
  either way, so the scores are equal), and a BiLSTM runs each direction unpacked: forward
  over the padded batch, read at each text's last token; backward over each text reversed
  within its length (what `pack_padded_sequence` computes).

Example:
    >>> view, example, dynamic = export_view(backbone, model)  # doctest: +SKIP
    >>> view(**example).shape                                    # doctest: +SKIP
    torch.Size([2, 2])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tl_ray.errors import BackboneError

__all__ = ["EXAMPLE_TEXTS", "export_view"]

# Two texts of different lengths (the shorter is padded); the made-up words are unknown to
# any vocabulary, so a word-vectors batch has several batch-local OOV rows (oov: subword).
EXAMPLE_TEXTS = ["a fine film", "a second, much longer sentence with qzxvjk wqpfrt and blorptz in it"]
TORCH_KINDS = ("hf-text", "word-vectors")


class HFTextView(nn.Module):
    """`TextClassifier` with named tensor inputs (the tokenizer's keys)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        encoder = model.encoder
        if hasattr(encoder, "merge_and_unload"):  # peft LoRA: fold the adapters into the weights
            model.encoder = encoder.merge_and_unload()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return self.model(attention_mask=attention_mask, **inputs)


class WordVectorsView(nn.Module):
    """`WordVectorsClassifier` in eval mode, with no branch on the batch's length."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        if model.encoder_kind == "bilstm":
            self.forward_lstm = _one_direction(model.lstm, "")
            self.backward_lstm = _one_direction(model.lstm, "_reverse")

    def forward(self, input_ids: torch.Tensor, oov_vectors: torch.Tensor | None = None) -> torch.Tensor:
        model = self.model
        x = model.embed(input_ids, oov_vectors)
        present = input_ids != 0
        lengths = present.sum(1)
        if model.encoder_kind == "mean":
            mask = present.unsqueeze(-1).to(x.dtype)
            pooled = (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        elif model.encoder_kind == "cnn":
            pooled = model._cnn(F.pad(x, (0, 0, 0, max(model.filters) - 1)), lengths)
        else:
            pooled = self._bilstm(x, lengths.clamp(min=1))
        return model.classifier(pooled)

    def _bilstm(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Final hidden states of both directions, as the packed BiLSTM gives them."""
        steps = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        last = (lengths - 1).unsqueeze(1)  # (batch, 1): each text's last token
        order = torch.where(steps <= last, last - steps, steps)  # reverse within the length
        reversed_x = torch.gather(x, 1, order.unsqueeze(-1).expand_as(x))
        forward, _ = self.forward_lstm(x)
        backward, _ = self.backward_lstm(reversed_x)
        at_last = last.unsqueeze(-1).expand(-1, 1, forward.shape[-1])
        return torch.cat([forward.gather(1, at_last).squeeze(1), backward.gather(1, at_last).squeeze(1)], -1)


def _one_direction(lstm: nn.LSTM, suffix: str) -> nn.LSTM:
    """A one-layer, one-direction LSTM sharing the weights of `lstm`'s direction `suffix`."""
    single = nn.LSTM(lstm.input_size, lstm.hidden_size, batch_first=True)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        setattr(single, f"{name}_l0", getattr(lstm, f"{name}_l0{suffix}"))
    return single.eval()


def export_view(
    backbone: Any, model: nn.Module, max_length: int = 128
) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, dict[int, Any]]]:
    """(export-ready module, example inputs, dynamic shapes) for a torch family's model."""
    kind = backbone.kind
    if kind not in TORCH_KINDS:
        raise BackboneError(f"ONNX export covers backbone kinds {', '.join(TORCH_KINDS)}, not {kind!r}")
    model.eval()
    example = {k: v for k, v in backbone.preprocess(EXAMPLE_TEXTS, max_length).items()
               if isinstance(v, torch.Tensor)}  # fmt: skip
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic: dict[str, dict[int, Any]] = {name: {0: batch, 1: sequence} for name in example}
    if kind == "hf-text":
        view: nn.Module = HFTextView(model)
    else:
        view = WordVectorsView(model)
        if "oov_vectors" in example:
            dynamic["oov_vectors"] = {0: torch.export.Dim("oov")}
    return view.eval(), example, dynamic
