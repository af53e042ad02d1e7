"""DFME: data-free model extraction with a generator and zeroth-order gradients through the API.

Truong, Maini, Walls and Papernot, "Data-Free Model Extraction", CVPR 2021 (arXiv 2011.14779).
Reference implementation: cake-lab/datafree-model-extraction (``dfme/train.py``,
``dfme/approximate_gradients.py``, ``dfme/network/gan.py``).

The attacker holds no data. A generator ``G`` (:class:`~sameguard.models.generator.GeneratorA`)
turns noise into images ``x = tanh(x_pre)``; the student ``S`` (the substitute) learns to match
the victim on them while ``G`` learns to make them disagree:

* **Logit recovery**: the API returns probabilities ``p``; the attacker uses
  ``v = log p - mean_k log p`` (``logit_correction="mean"``, the reference's default; ``"min"``
  subtracts the minimum, ``"none"`` keeps ``log p``). Probabilities that underflow to 0 are floored
  at the smallest normal float32 before the log.
* **Student step** (``d_iter = 5`` per iteration, ``N`` fresh images each, ``N`` queries each):
  minimise ``L_S = mean |S(x) - v(x)|`` (ℓ1) with SGD (lr 0.1, momentum 0.9, weight decay 5e-4).
* **Generator step** (``g_iter = 1`` per iteration): maximise the same disagreement. Its gradient
  with respect to ``x_pre`` is estimated by forward differences through the API with ``m`` random
  directions ``u_i`` uniform on the unit sphere of dimension ``d = C*H*W``:
  ``grad ≈ (1/m) sum_i d * [L(x_pre + eps u_i) - L(x_pre)] / eps * u_i`` (``eps = 1e-3``), where
  ``L`` is the negated per-image ℓ1 disagreement evaluated at ``tanh`` of the points; as in the
  reference the estimate is divided by ``K * N`` and back-propagated through ``G`` with
  ``x_pre.backward(grad)``; ``G`` is trained with Adam (lr 1e-4). Each generator step sends
  ``N * (m + 1)`` images (the ``m`` perturbed points and the unperturbed one).
* **Query accounting**: every image sent counts. One iteration costs
  ``N * (g_iter * (m + 1) + d_iter)`` queries (256 * 7 = 1792 with the defaults). The last
  iteration shrinks its batch to ``n = left // (g_iter * (m + 1) + d_iter)`` images, and the fewer
  than ``g_iter * (m + 1) + d_iter`` queries still left after it go to one more student step on
  that many images, so the attack spends its budget exactly and never overshoots (the reference
  stops as soon as a full iteration no longer fits).
* **Schedule**: both learning rates are multiplied by ``lr_scale = 0.3`` after 10 %, 30 % and 50 %
  of the iterations (the reference steps per epoch of 50 iterations; here per iteration).

DFME needs probability outputs: against a label-only API :meth:`DFME.run` raises
:class:`~sameguard.attacks.base.UnsupportedOutputError` before sending anything. Its paper
budgets are millions of queries (2M SVHN, 20M CIFAR-10); at a few thousand it barely learns.
The student defaults to the victim's architecture (the paper uses ResNet-18-8x against
ResNet-34-8x).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..models.generator import GeneratorA
from ..prediction_api import BoundClient
from ..training import show_progress
from ..validation import check_int, check_positive
from .base import ExtractionAttack

logger = logging.getLogger(__name__)

__all__ = ["DFME", "recover_logits", "dfme_query_cost", "zeroth_order_gradient"]

LOGIT_CORRECTIONS = ("mean", "min", "none")


def recover_logits(probs: torch.Tensor, correction: str = "mean") -> torch.Tensor:
    """Logits up to a per-row constant from probabilities ``(N, K)``: ``log p - mean_k log p``.

    ``correction="min"`` subtracts the row minimum instead, ``"none"`` returns ``log p``.
    Zero probabilities are floored at the smallest normal float32 (``log`` of it is about -87.3).
    """
    logp = torch.log(probs.float().clamp_min(torch.finfo(torch.float32).tiny))
    if correction == "mean":
        return logp - logp.mean(dim=1, keepdim=True)
    if correction == "min":
        return logp - logp.min(dim=1, keepdim=True).values
    if correction == "none":
        return logp
    raise ValueError(f"logit_correction must be one of {LOGIT_CORRECTIONS}, got {correction!r}.")


def dfme_query_cost(batch_size: int, grad_m: int, g_iter: int, d_iter: int) -> int:
    """Queries of one full DFME iteration: ``N * (g_iter * (m + 1) + d_iter)``."""
    return batch_size * (g_iter * (grad_m + 1) + d_iter)


@torch.no_grad()
def zeroth_order_gradient(
    objective: Callable[[torch.Tensor], torch.Tensor],
    x_pre: torch.Tensor,
    m: int,
    epsilon: float,
    generator: torch.Generator,
    activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-difference estimate of the gradient of ``objective(activation(x_pre))`` per image.

    For each image ``x`` of ``x_pre`` ``(n, C, H, W)``, ``m`` directions ``u_i`` are drawn uniformly
    on the unit sphere of dimension ``d = C*H*W`` and
    ``grad ≈ (1/m) sum_i d * [L(x + eps u_i) - L(x)] / eps * u_i`` with
    ``L(y) = objective(activation(y))`` (DFME's ``estimate_gradient_objective`` with
    ``forward_differences=1``). ``objective`` is called **once** on all ``n * (m + 1)`` points
    (each image's ``m`` perturbed points, then the image itself), e.g. one batch of API queries.

    Args:
        objective: ``images (n*(m+1), C, H, W) -> (n*(m+1),)`` values to ascend.
        x_pre: ``(n, C, H, W)`` pre-activation points.
        m: number of random directions.
        epsilon: finite-difference step.
        generator: source of the directions.
        activation: applied to the points before ``objective`` (``tanh``: images in ``(-1, 1)``).

    Returns:
        ``(grad, values)``: the estimate ``(n, C, H, W)`` and ``objective`` at the unperturbed
        points ``(n,)``.
    """
    n, shape = x_pre.shape[0], x_pre.shape[1:]
    dim = int(math.prod(shape))
    u = torch.randn(n, m, dim, generator=generator)
    u = (u / u.norm(dim=2, keepdim=True)).to(x_pre.device)
    u = torch.cat([u, torch.zeros(n, 1, dim, device=x_pre.device)], dim=1).view(n, m + 1, *shape)
    points = activation(x_pre[:, None] + epsilon * u).reshape(-1, *shape)
    values = objective(points).reshape(n, m + 1)
    diffs = (values[:, :m] - values[:, m:]).view(n, m, *([1] * len(shape)))
    grad = ((dim / epsilon) * diffs * u[:, :m]).mean(dim=1)
    return grad, values[:, m]


class DFME(ExtractionAttack):
    """Data-free model extraction (Truong et al., CVPR 2021); see the module docstring.

    Args:
        batch_size: ``N``, images per generator / student step (256).
        nz: generator noise dimension (256).
        ngf: generator width (64).
        grad_m: random directions ``m`` of the zeroth-order estimate (1).
        grad_epsilon: finite-difference step ``eps`` (1e-3).
        g_iter: generator steps per iteration (1).
        d_iter: student steps per iteration (5).
        lr: student SGD learning rate (0.1); ``momentum`` 0.9, ``weight_decay`` 5e-4.
        lr_generator: generator Adam learning rate (1e-4, the reference's CIFAR-10 value).
        lr_steps: fractions of the iterations after which both rates are scaled (0.1, 0.3, 0.5).
        lr_scale: the scale factor (0.3).
        logit_correction: ``"mean"`` (default), ``"min"`` or ``"none"``; see :func:`recover_logits`.
        query_batch_size: most images per API call (1024); a step's images may take several calls.
        **kwargs: the shared knobs of :class:`~sameguard.attacks.base.ExtractionAttack`
            (``substitute_arch``, ``seed``, ``device``, ``progress``).
    """

    name: ClassVar[str] = "dfme"
    data_role: ClassVar[str | None] = None

    def __init__(
        self,
        *,
        batch_size: int = 256,
        nz: int = 256,
        ngf: int = 64,
        grad_m: int = 1,
        grad_epsilon: float = 1e-3,
        g_iter: int = 1,
        d_iter: int = 5,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_generator: float = 1e-4,
        lr_steps: Sequence[float] = (0.1, 0.3, 0.5),
        lr_scale: float = 0.3,
        logit_correction: Literal["mean", "min", "none"] = "mean",
        query_batch_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        if "epochs" in kwargs or "use_probabilities" in kwargs or "augment" in kwargs:
            raise ValueError("DFME trains its student online; epochs, use_probabilities and augment do not apply.")
        super().__init__(batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         query_batch_size=query_batch_size, **kwargs)
        self.nz = check_int(nz, "nz")
        self.ngf = check_int(ngf, "ngf")
        self.grad_m = check_int(grad_m, "grad_m")
        self.grad_epsilon = check_positive(grad_epsilon, "grad_epsilon")
        self.g_iter = check_int(g_iter, "g_iter", minimum=0)
        self.d_iter = check_int(d_iter, "d_iter")
        self.lr_generator = check_positive(lr_generator, "lr_generator")
        steps = tuple(float(s) for s in lr_steps)
        if any(not 0.0 <= s <= 1.0 for s in steps):
            raise ValueError(f"lr_steps must be fractions in [0, 1], got {tuple(lr_steps)!r}.")
        self.lr_steps = steps
        self.lr_scale = check_positive(lr_scale, "lr_scale")
        if logit_correction not in LOGIT_CORRECTIONS:
            raise ValueError(f"logit_correction must be one of {LOGIT_CORRECTIONS}, got {logit_correction!r}.")
        self.logit_correction = logit_correction

    def requires_probabilities(self) -> bool:
        return True

    @property
    def per_sample_cost(self) -> int:
        """Queries per batch element of one iteration: ``g_iter * (m + 1) + d_iter``."""
        return self.g_iter * (self.grad_m + 1) + self.d_iter

    @property
    def cost_per_iteration(self) -> int:
        """``N * (g_iter * (m + 1) + d_iter)``."""
        return dfme_query_cost(self.batch_size, self.grad_m, self.g_iter, self.d_iter)

    # -- pieces ---------------------------------------------------------------------------------
    def _ask(self, oracle: BoundClient, x: torch.Tensor) -> torch.Tensor:
        """Victim logits (recovered) of ``x`` on the CPU, in API calls of ``query_batch_size``."""
        x = x.detach().cpu()
        probs = torch.cat([oracle.query(x[s:s + self.query_batch_size])
                           for s in range(0, len(x), self.query_batch_size)])
        return recover_logits(probs, self.logit_correction)

    def _noise(self, n: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.nz, generator=g).to(self.device)

    def _generator_step(self, oracle: BoundClient, generator: nn.Module, student: nn.Module,
                        opt_g: torch.optim.Optimizer, n: int, g: torch.Generator, k: int) -> float:
        """One zeroth-order generator step on ``n`` images: ``n * (m + 1)`` queries."""
        generator.train()
        student.eval()
        opt_g.zero_grad(set_to_none=True)
        x_pre = generator(self._noise(n, g), pre_activation=True)  # (n, C, H, W)

        def disagreement(points: torch.Tensor) -> torch.Tensor:  # -|S(x) - v(x)| per image, queried
            victim_logits = self._ask(oracle, points).to(self.device)
            return -F.l1_loss(student(points), victim_logits, reduction="none").mean(dim=1)

        grad, loss = zeroth_order_gradient(disagreement, x_pre.detach(), self.grad_m, self.grad_epsilon, g)
        x_pre.backward(grad / (k * n))  # the reference's scaling; Adam is insensitive to it
        opt_g.step()
        student.train()
        return float(loss.mean())

    def _student_step(self, oracle: BoundClient, generator: nn.Module, student: nn.Module,
                      opt_s: torch.optim.Optimizer, n: int, g: torch.Generator) -> float:
        """One student step on ``n`` fresh generated images: ``n`` queries."""
        with torch.no_grad():
            x = generator(self._noise(n, g)).detach()
        target = self._ask(oracle, x).to(self.device)
        student.train()
        loss = F.l1_loss(student(x), target)
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        opt_s.step()
        return float(loss.detach())

    # -- the attack -----------------------------------------------------------------------------
    def _extract(self, oracle: BoundClient, budget: int) -> tuple[nn.Module, dict[str, Any]]:
        c, h, w = oracle.image_shape
        if h != w:
            raise ValueError(f"DFME's generator makes square images; the victim takes {h}x{w}.")
        k = oracle.num_classes
        g = self._generator()
        student = self._new_substitute(oracle.image_shape, k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            generator = GeneratorA(nz=self.nz, ngf=self.ngf, out_channels=c, image_size=h).to(self.device)
        opt_s = torch.optim.SGD(student.parameters(), lr=self.lr, momentum=self.momentum,
                                weight_decay=self.weight_decay)
        opt_g = torch.optim.Adam(generator.parameters(), lr=self.lr_generator)
        planned = max(1, math.ceil(budget / self.cost_per_iteration))
        milestones = sorted({int(s * planned) for s in self.lr_steps})
        sched_s = torch.optim.lr_scheduler.MultiStepLR(opt_s, milestones, self.lr_scale)
        sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, milestones, self.lr_scale)
        bar = tqdm(total=budget, desc=f"{self.name} queries", disable=not show_progress(self.progress), leave=False)
        full, partial_batch, leftover = 0, 0, 0
        loss_g = loss_s = float("nan")
        student.train()
        while oracle.used < budget:
            left = budget - oracle.used
            n = self.batch_size if left >= self.cost_per_iteration else left // self.per_sample_cost
            before = oracle.used
            if n >= 1:
                for _ in range(self.g_iter):
                    loss_g = self._generator_step(oracle, generator, student, opt_g, n, g, k)
                for _ in range(self.d_iter):
                    loss_s = self._student_step(oracle, generator, student, opt_s, n, g)
                if n == self.batch_size:
                    full += 1
                else:
                    partial_batch = n
                sched_s.step()
                sched_g.step()
            else:  # fewer queries left than one batch element costs: one last student step
                leftover = left
                loss_s = self._student_step(oracle, generator, student, opt_s, left, g)
            bar.update(oracle.used - before)
            bar.set_postfix(loss_s=f"{loss_s:.3f}", loss_g=f"{loss_g:.3f}")
        bar.close()
        logger.info("dfme: %d full iterations of %d queries, partial batch %d, %d leftover queries",
                    full, self.cost_per_iteration, partial_batch, leftover)
        return student.eval(), {
            "cost_per_iteration": self.cost_per_iteration,
            "full_iterations": full,
            "partial_batch": partial_batch,
            "leftover_student_queries": leftover,
            "generator": generator.eval(),
        }
