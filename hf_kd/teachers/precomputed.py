"""A teacher whose predictions travel with the rows (ranking scores, federated clients' predictions)."""

from __future__ import annotations

import torch
from torch import nn


class PrecomputedPredictions(nn.Module):
    """A teacher whose predictions were computed beforehand and travel with the rows as its view (:mod:`hf_kd.views`):
    the column ``teacher_COLUMN`` is returned as its logits — ranking scores, or the predictions a federated client
    sent for a public data set. Several such teachers (one column each) form a multi-teacher ensemble."""

    def __init__(self, column: str, hint: str = "give every row the teacher's predictions"):
        super().__init__()
        self.column, self.hint = column, hint
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # places the teacher (device, dtype)

    def forward(self, **view):
        if view.get(self.column) is None:
            raise ValueError(f"{type(self).__name__} reads the teacher_{self.column} column: {self.hint}.")
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=view[self.column].float())
