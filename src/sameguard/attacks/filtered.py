"""Detector-aware filtering: send only the proxy images one's own copy of the detector finds benign.

Family 3 of the adaptive attacks in ``reference/methods.md`` A6. The attacker knows which detector
the provider runs (Kerckhoffs: the defence is public, its training data and weights are not), builds
its own copy from what it has, scores a candidate pool ``pool_factor`` times larger than its budget
and sends only the least suspicious candidates. Known precedents: the "EntropyRev" and "WorstCase"
query selections against calibrated proof-of-work (Dziedzic et al., ICLR 2022;
cleverhans-lab/model-extraction-iclr ``main_model_extraction.py``), and BEST (Li et al., ICLR 2023)
selecting uncertain examples. The copies:

* ``scorer="msp"`` / ``"energy"``: the attacker's *current substitute* stands in for the victim, and
  the score is MSP (``-max softmax``, Hendrycks and Gimpel 2017) or the free energy
  (``-logsumexp`` of the logits, Liu et al. 2020) of the substitute -- the same formulas as
  :mod:`sameguard.detectors.msp` and :mod:`sameguard.detectors.energy`. With no substitute yet,
  the first round sends a random draw from the pool (a warm-up).
* ``scorer="same"``: a small SAME (:class:`~sameguard.detectors.SAMEDetector`, preset ``copy_preset``,
  ``cpu`` by default, authors' alpha = 0.99) fitted on the attacker's own in-distribution images
  (``num_seeds`` of ``seed_data``, with their labels for the auxiliary classifier); its ``s2``
  term compares the auxiliary classifier with the attacker's current substitute, the only "victim"
  it has. Its MAE sees what the defender's does: whether a query is easy to reconstruct.

Schedule: the budget is split into ``rounds`` nearly equal chunks. In round ``r`` the copy scores
every candidate not yet sent and the ``n_r`` lowest-scored are sent (ties broken by pool order);
after each round the substitute is retrained from scratch on every answer so far
(``round_epochs``), and at the end for ``epochs``. The pool is ``round(pool_factor * budget)``
proxy images drawn without replacement (cycling, so duplicates only when the pool is larger than
the proxy set). Works on label-only APIs: the copy only ever uses the attacker's own models.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from ..data import ImageDataset
from ..detectors.energy import energy_score
from ..detectors.msp import msp_score
from ..prediction_api import BoundClient
from ..training import predict_in_batches
from ..validation import check_choice, check_int
from ._pool import PoolAttack, cycling_order

logger = logging.getLogger(__name__)

__all__ = ["FilteredKnockoff", "least_suspicious", "SCORERS"]

SCORERS = ("same", "msp", "energy")


def least_suspicious(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` lowest ``scores`` (larger = more suspicious), lowest first; ties keep order."""
    scores = torch.as_tensor(scores).flatten()
    if not 0 <= n <= len(scores):
        raise ValueError(f"Cannot keep {n} of {len(scores)} candidates.")
    return torch.argsort(scores, stable=True)[:n]


class _SubstituteView(nn.Module):
    """The attacker's current substitute seen as a victim: ``images -> probabilities (N, K)``."""

    def __init__(self, model: nn.Module, arch: str, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.model, self.arch, self.image_shape, self.num_classes = model, arch, image_shape, num_classes

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        device = next(self.model.parameters()).device
        return torch.softmax(self.model(x.to(device)), dim=1).cpu()


class FilteredKnockoff(PoolAttack):
    """Knockoff that sends only the candidates its own detector copy scores lowest.

    Args:
        proxy: the attacker's proxy pool (the candidates come from it).
        seed_data: its in-distribution images (used by ``scorer="same"`` only; may be ``None`` otherwise).
        scorer: ``"same"``, ``"msp"`` or ``"energy"`` (``"msp"``).
        pool_factor: candidate pool size as a multiple of the budget, ``>= 1`` (3.0).
        rounds: filtering rounds (4); the substitute is retrained between rounds.
        round_epochs: substitute epochs between rounds (10).
        num_seeds: in-distribution images for the SAME copy (2000; capped at ``seed_data``'s size).
        copy_preset: preset of the SAME copy (``"cpu"``).
        copy_params: hyper-parameters of the SAME copy on top of the preset (e.g. ``{"mae_epochs": 2}``).
        **kwargs: as :class:`~sameguard.attacks._pool.PoolAttack`.
    """

    name: ClassVar[str] = "knockoff-filtered"
    needs_seeds: ClassVar[bool] = False

    def __init__(self, proxy: ImageDataset, seed_data: ImageDataset | None = None, *, scorer: str = "msp",
                 pool_factor: float = 3.0, rounds: int = 4, round_epochs: int = 10, num_seeds: int | None = 2000,
                 copy_preset: str | None = "cpu", copy_params: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if seed_data is not None and num_seeds is not None:
            num_seeds = min(num_seeds, len(seed_data))
        super().__init__(proxy, seed_data, num_seeds=num_seeds, **kwargs)
        self.scorer = check_choice(scorer, "scorer", SCORERS)
        if self.scorer == "same" and self.seed_data is None:
            raise ValueError("scorer='same' needs seed_data: the in-distribution images its SAME copy is fitted on.")
        if isinstance(pool_factor, bool) or not isinstance(pool_factor, (int, float)) or pool_factor < 1:
            raise ValueError(f"pool_factor must be a number >= 1 (the pool holds pool_factor x budget candidates), "
                             f"got {pool_factor!r}.")
        self.pool_factor = float(pool_factor)
        self.rounds = check_int(rounds, "rounds")
        self.round_epochs = check_int(round_epochs, "round_epochs")
        self.copy_preset = copy_preset
        self.copy_params = dict(copy_params or {})

    # -- the attacker's copy of the detector ----------------------------------------------------
    def _same_copy(self, view: _SubstituteView) -> Any:
        from ..detectors import build_detector

        assert self.seed_data is not None
        data = self.seed_data if self.num_seeds is None else self.seed_data.take(self.num_seeds, seed=self.seed)
        detector = build_detector("same", self.copy_params, preset=self.copy_preset, seed=self.seed + 1,
                                  device=self.device, progress=self.progress)
        logger.info("%s: fitting its SAME copy on %d in-distribution images", self.name, len(data))
        detector.fit(view, train_data=data)
        if detector.needs_calibration:  # sameguard's default score: terms standardised on benign images
            detector.calibrate(data.images)
        return detector

    def _score(self, x: torch.Tensor, model: nn.Module | None, same: Any) -> torch.Tensor:
        if self.scorer == "same":
            return torch.as_tensor(same.score(x)).double().cpu()
        assert model is not None
        model.eval()
        with torch.no_grad():
            logits = predict_in_batches(model, x, 512, self.device).double()
        if self.scorer == "msp":
            return msp_score(torch.softmax(logits, dim=1)).double()
        return energy_score(logits).double()

    # -- the attack ------------------------------------------------------------------------------
    def _extract(self, oracle: BoundClient, budget: int) -> tuple[nn.Module, dict[str, Any]]:
        g = self._generator()
        pool_size = max(budget, int(round(self.pool_factor * budget)))
        candidates = self._proxy_images(cycling_order(len(self.proxy), pool_size, g), oracle.image_shape)
        unsent = torch.ones(pool_size, dtype=torch.bool)
        model: nn.Module | None = None
        same = None
        if self.scorer == "same":
            c = oracle.image_shape[0]
            arch = self.substitute_arch or self._arch_hint or ("lenet5" if c == 1 else "resnet18")
            view = _SubstituteView(self._new_substitute(oracle.image_shape, oracle.num_classes, seed_offset=1000),
                                   arch, oracle.image_shape, oracle.num_classes)
            same = self._same_copy(view)
        rounds = min(self.rounds, budget)
        sent_x, answers, sent_scores, pool_scores = [], [], [], []
        for r in range(rounds):
            n = budget * (r + 1) // rounds - budget * r // rounds
            left = torch.nonzero(unsent).flatten()
            if model is None and same is None:  # msp/energy before any substitute: a random warm-up draw
                pick = left[torch.randperm(len(left), generator=g)[:n]]
            else:
                scores = self._score(candidates[left], model, same)
                chosen = least_suspicious(scores, n)
                pick = left[chosen]
                sent_scores.append(scores[chosen])
                pool_scores.append(scores)
            unsent[pick] = False
            x = candidates[pick]
            answers.append(self._send(oracle, x, desc=f"{self.name} round {r + 1}/{rounds}"))
            sent_x.append(x)
            if r < rounds - 1:
                model = self._fit_substitute(oracle, torch.cat(sent_x), torch.cat(answers), epochs=self.round_epochs,
                                             seed_offset=r + 1)
                if same is not None:  # the copy's s2 now compares with the newest substitute
                    same.victim_ = _SubstituteView(model, view.arch, oracle.image_shape, oracle.num_classes)
        final = self._fit_substitute(oracle, torch.cat(sent_x), torch.cat(answers))
        details: dict[str, Any] = {"scorer": self.scorer, "pool_size": pool_size, "pool_factor": self.pool_factor,
                                   "rounds": rounds, "distinct_pool_images": min(pool_size, len(self.proxy))}
        if sent_scores:
            details["copy_score_sent_mean"] = float(torch.cat(sent_scores).mean())
            details["copy_score_pool_mean"] = float(torch.cat(pool_scores).mean())
        return final, details
