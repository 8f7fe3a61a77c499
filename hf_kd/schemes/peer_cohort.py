"""Several models trained together as one module (the peers of deep mutual learning): one optimizer over all of
them, one DDP wrapper, and one checkpoint folder per peer that ``from_pretrained`` reads."""

from __future__ import annotations

import inspect
import os

from torch import nn

from ..checkpoints import load_saved_weights
from ..features import run_model
from ..model_kinds import base_model
from ..trainer.members import MemberModule

PEER_PREFIX = "peer"  # peers given as a list are named peer0, peer1, ...


class PeerCohort(MemberModule):
    """``peers`` (name → model) as one module. ``forward`` runs every peer on the same inputs, through the one
    wrapper DDP puts around the cohort, so that every peer's gradients are synchronised.

    Args:
        peers: the models, by name.
    """

    def __init__(self, peers: dict[str, nn.Module]):
        super().__init__()
        self.peers = nn.ModuleDict(peers)

    @property
    def members(self) -> list[str]:
        """The peers' names."""
        return list(self.peers)

    def forward(self, needs: frozenset[str] = frozenset({"logits"}), **inputs) -> dict[str, tuple]:
        """Run every peer on the same inputs.

        Args:
            needs: the features to gather from each peer (``"logits"``, ``"hidden_states"``, ...).
            **inputs: the batch.

        Returns:
            ``{name: (outputs, ModelFeatures)}``: each peer's own outputs (its label loss among them when
                ``inputs`` hold labels) and the features ``needs`` asks for.
        """
        return {name: run_model(peer, inputs, needs) for name, peer in self.peers.items()}

    def signature_columns(self) -> list[str]:
        """The inputs any peer's forward takes (the Trainer keeps those data columns; a PEFT peer's: its base's).

        Returns:
            The parameter names, sorted.
        """
        columns = (inspect.signature(base_model(peer).forward).parameters for peer in self.peers.values())
        return sorted({name for parameters in columns for name in parameters})

    # What the trainer's checkpoints hold: one from_pretrained folder per peer (see hf_kd.trainer.compat).
    def save_checkpoint(self, folder: str, processing_class=None) -> None:
        """Every peer to ``folder/NAME`` with ``save_pretrained`` (and the processor beside it).

        Args:
            folder: the checkpoint (or output) folder.
            processing_class: the tokenizer or processor saved beside each peer, or None.
        """
        for name, peer in self.peers.items():
            peer.save_pretrained(os.path.join(folder, name))
            if processing_class is not None:
                processing_class.save_pretrained(os.path.join(folder, name))

    def load_checkpoint(self, folder: str) -> None:
        """Every peer's weights from ``folder/NAME`` (a checkpoint that :meth:`save_checkpoint` wrote; a PEFT peer's
        adapter).

        Args:
            folder: the checkpoint folder.
        """
        for name, peer in self.peers.items():
            load_saved_weights(peer, os.path.join(folder, name), f"peer {name!r} of {list(self.peers)}")
