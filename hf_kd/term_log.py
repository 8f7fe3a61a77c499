"""Running sums of the logged loss terms, reduced across processes in one collective per log.

Every process keeps the same fixed, sorted list of term names (``ce`` and every configured loss) and, per name, a
value sum and a weight sum. A term a process did not compute in a micro-batch (``ce`` on a batch without labels) adds
zero to both, so every process reduces the same tensor in the same order whatever its batches held — one
``all_reduce`` of a ``terms × 2`` tensor per log, never one per term.

The trainer decides the weights (``DistillationTrainer._record_terms``): in training a value is its micro-batch's
share of the step's term and weighs ``1 / micro-batches``, so the log is the mean per step over the steps in which
the term was computed anywhere; in evaluation a value is multiplied by the items it averages (label tokens,
distilled positions), so the log is the mean per item over the whole set. A term normalised by counts summed over
processes is a share of the global value on each process; its weight then comes from the global counts, recorded by
every process (also where its own share was zero), so ``Σ values / Σ weights`` over processes is what one process
with the same global batch logs.
"""

from __future__ import annotations

import torch


class TermLog:
    """Sums of ``terms`` for the modes ``"train"`` and ``"eval"``, kept on ``device`` without host syncs.

    Args:
        names: The logged term names (deduplicated and sorted, the same on every process).
        device: Where the sums live.
    """

    def __init__(self, names: list[str], device: torch.device):
        self.names = sorted(set(names))
        self._row = {name: row for row, name in enumerate(self.names)}
        self._device = device
        self._sums = {mode: self._zeros() for mode in ("train", "eval")}

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(len(self.names), 2, dtype=torch.float32, device=self._device)

    def record(self, mode: str, terms: dict[str, torch.Tensor], weights: dict[str, torch.Tensor | float]) -> None:
        """Add each term's detached value, and each named weight (the step share it stands for).

        Args:
            mode: ``"train"`` or ``"eval"``.
            terms: Values by term name.
            weights: Weights by term name.

        Raises:
            KeyError: a name that is not among the logged terms.
        """
        sums = self._sums[mode]
        unknown = (terms.keys() | weights.keys()) - self._row.keys()
        if unknown:
            raise KeyError(f"terms {sorted(unknown)} are not among the logged terms {self.names}.")
        for name, value in terms.items():
            sums[self._row[name], 0] += value.detach().to(sums.device, sums.dtype)
        for name, weight in weights.items():
            weight = weight.to(sums.device, sums.dtype) if torch.is_tensor(weight) else weight
            sums[self._row[name], 1] += weight

    def reset(self, mode: str) -> None:
        """Zero the sums of one mode.

        Args:
            mode: ``"train"`` or ``"eval"``.
        """
        self._sums[mode] = self._zeros()

    def reduce(self, mode: str, accelerator=None) -> dict[str, float]:
        """The mean of every term computed since the last reset, rounded to 6 decimals; resets ``mode``.

        Terms computed nowhere are left out. Collective: every process must call it at the same point.

        Args:
            mode: ``"train"`` or ``"eval"``.
            accelerator: Sums over processes when it runs several.

        Returns:
            ``Σ values / Σ weights`` by term name.
        """
        sums = self._sums[mode]
        self.reset(mode)
        if accelerator is not None and accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        values, weights = sums.cpu().unbind(1)
        return {
            name: round(float(value / weight), 6)
            for name, value, weight in zip(self.names, values.tolist(), weights.tolist())
            if weight > 0
        }
