"""Which iterate an edit ends with. A primal-dual trajectory is not monotone, so the last iterate is
not necessarily the best; the choice uses the edit's own training rows, never evaluation data.

* By objective (fixed steps, the paper's formulation): the iterate with the lowest objective among
  those whose IN row gives the target.
* By checks (``constraints``): the checked iterate that meets the most constraints - the IN row
  first, then the number of groups that hold, then the shares of SE and OUT rows that do. The group
  weights change between checks, so objective values would not compare.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


class BestIterate:
    def __init__(self, params: Dict[str, torch.nn.Parameter], by_checks: bool):
        self.params, self.by_checks = params, by_checks
        self.best: Optional[Tuple[object, Dict[str, torch.Tensor]]] = None  # (rank, {name: tensor})

    @torch.no_grad()
    def offer_step(self, objective: float, makes_edit: bool) -> None:
        """After a step evaluated at the current parameters (by objective only)."""
        if not self.by_checks and makes_edit and (self.best is None or objective < self.best[0]):
            self._keep(objective)

    @torch.no_grad()
    def offer_check(self, holds: Dict[str, bool], se_share: float, out_share: float) -> None:
        """After a constraint check of the current parameters."""
        rank = (holds["IN"], sum(holds.values()), se_share + out_share)
        if self.best is None or rank > self.best[0]:
            self._keep(rank)

    def _keep(self, rank) -> None:
        self.best = (rank, {k: p.detach().clone() for k, p in self.params.items()})

    @torch.no_grad()
    def load(self) -> None:
        """Put the chosen iterate into the parameters (nothing chosen: they stay as they are)."""
        if self.best is not None:
            for name, value in self.best[1].items():
                self.params[name].copy_(value)
