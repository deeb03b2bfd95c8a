"""The hf-text model: a transformer encoder, pooling and a linear head (`TextClassifier`).

It also runs from the frozen bottom's cached output (tl_ray.train.feature_cache): from the
hidden states entering its first trainable layer, or from the pooled features at depth 0.
"""

from __future__ import annotations

import torch
from torch import nn

from tl_ray.errors import BackboneError

__all__ = ["TextClassifier"]


class TextClassifier(nn.Module):
    """A transformer encoder, a pooling step ([CLS] pooler or masked mean) and a linear head.

    Three ways in, all giving the same logits: token ids (`input_ids`, `attention_mask`);
    `hidden_states` entering encoder layer `frozen_layers` (with `attention_mask`); or the
    `pooled` features (depth 0). The last two come from `frozen_features`, computed once.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.num_labels = num_labels
        self.frozen_layers = 0  # encoder layers below the trainable ones (set by apply_unfreeze)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def train(self, mode: bool = True) -> "TextClassifier":
        """Train mode, except that fully frozen parts of the encoder keep dropout off."""
        super().train(mode)
        if mode:
            for module in self.encoder.modules():
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()
        return self

    def forward(
        self,
        attention_mask: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        **inputs: torch.Tensor,
    ) -> torch.Tensor:
        if pooled is None:
            if hidden_states is None:
                outputs = self.encoder(attention_mask=attention_mask, **inputs)
                hidden, pooler_output = outputs.last_hidden_state, getattr(outputs, "pooler_output", None)
            else:
                hidden, pooler_output = self._from_layer(hidden_states, attention_mask)
            pooled = self._pool(hidden, attention_mask, pooler_output)
        return self.classifier(self.dropout(pooled))

    def _pool(self, hidden, attention_mask, pooler_output) -> torch.Tensor:
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if pooler_output is not None:
            return pooler_output
        return hidden[:, 0]

    def _from_layer(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        """Run encoder layers `frozen_layers`.. and the pooler, as the encoder's forward does."""
        from transformers.masking_utils import create_bidirectional_mask

        _, layers, pooler = _parts(self.encoder)
        mask = create_bidirectional_mask(
            config=self.encoder.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        for layer in layers[self.frozen_layers :]:
            hidden = layer(hidden, mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden, pooler(hidden) if pooler is not None else None

    @torch.no_grad()
    def frozen_features(self, attention_mask: torch.Tensor, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the frozen bottom computes: `pooled` at depth 0, else the `hidden_states`
        entering the first trainable layer (returned with their `attention_mask`)."""
        from transformers.masking_utils import create_bidirectional_mask

        embeddings, layers, _ = _parts(self.encoder)
        if self.frozen_layers >= len(layers):
            outputs = self.encoder(attention_mask=attention_mask, **inputs)
            pooler_output = getattr(outputs, "pooler_output", None)
            return {"pooled": self._pool(outputs.last_hidden_state, attention_mask, pooler_output)}
        hidden = embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"))
        mask = create_bidirectional_mask(
            config=self.encoder.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        for layer in layers[: self.frozen_layers]:
            hidden = layer(hidden, mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return {"hidden_states": hidden, "attention_mask": attention_mask}


def _parts(encoder: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module | None]:
    """(embeddings, encoder layers, pooler) of a BERT-shaped model (peft-wrapped or not)."""
    base = encoder.get_base_model() if hasattr(encoder, "get_base_model") else encoder
    try:
        return base.embeddings, base.encoder.layer, getattr(base, "pooler", None)
    except AttributeError:
        raise BackboneError(
            f"{type(base).__name__} is not laid out as embeddings -> encoder.layer -> pooler; "
            "use unfreeze_depth equal to its layer count, or a BERT-family encoder"
        ) from None
