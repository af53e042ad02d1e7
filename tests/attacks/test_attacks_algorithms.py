"""The pieces of each attack on hand-made cases: DFME's query formula and logit recovery, the
generator, JBDA's and JBDA-TR's perturbation directions, Knockoff's rewards and bandit, the normal
user, and the substitute benchmark's table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sameguard.attacks import DFME, JBDA, JBDATR, KnockoffNets, NormalUser, dfme_query_cost, recover_logits
from sameguard.attacks.dfme import zeroth_order_gradient
from sameguard.attacks.knockoff import _RewardState
from sameguard.bench.substitutes import format_table, run_substitute_benchmark
from sameguard.data import ImageDataset
from sameguard.guard import Guard
from sameguard.models import build_classifier
from sameguard.models.generator import GeneratorA
from sameguard.victim import Victim


class CallLog(Guard):
    """A Guard that remembers the size of every batch it answered."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []

    def query(self, x, client="anonymous"):
        out = super().query(x, client)
        self.calls.append(len(x))
        return out


def random_victim(shape=(1, 28, 28), k=10, seed=0) -> Victim:
    torch.manual_seed(seed)
    return Victim(build_classifier("lenet5", shape[0], shape[1], k), arch="lenet5", dataset="x",
                  image_shape=shape, classes=[str(i) for i in range(k)])


def noise_data(n=64, shape=(1, 28, 28), k=2, seed=0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    return ImageDataset("noise", "train", torch.rand(n, *shape, generator=g) * 2 - 1,
                        torch.arange(n) % k, tuple(str(i) for i in range(k)), False)


# -- DFME ---------------------------------------------------------------------------------------
def test_attacks_dfme_query_count_matches_its_formula():
    n, m, g_iter, d_iter = 4, 2, 1, 2
    assert dfme_query_cost(n, m, g_iter, d_iter) == n * (g_iter * (m + 1) + d_iter) == 20
    assert dfme_query_cost(256, 1, 1, 5) == 1792  # the paper's defaults
    api = CallLog(random_victim())
    attack = DFME(batch_size=n, grad_m=m, g_iter=g_iter, d_iter=d_iter, nz=8, ngf=8, seed=0, progress=False)
    result = attack.run(api, 67)
    # 3 full iterations (60 queries): a generator step sends n * (m + 1) images, each student step n;
    # then 7 left: a batch of 7 // 5 = 1 (5 queries) and a last student step on the 2 left.
    assert api.calls == [12, 4, 4] * 3 + [3, 1, 1] + [2]
    assert result.queries == 67 == api.queries_used(result.client)
    assert result.details["full_iterations"] == 3 and result.details["partial_batch"] == 1
    assert result.details["leftover_student_queries"] == 2
    api2 = CallLog(random_victim())
    DFME(batch_size=n, grad_m=m, g_iter=g_iter, d_iter=d_iter, nz=8, ngf=8, progress=False).run(api2, 40)
    assert api2.calls == [12, 4, 4] * 2  # a multiple of the cost: whole iterations only


def test_attacks_recover_logits_from_probabilities():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    v = recover_logits(torch.softmax(z, dim=1))
    torch.testing.assert_close(v, z - z.mean(1, keepdim=True), atol=1e-5, rtol=0)
    v = recover_logits(torch.softmax(z, dim=1), "min")
    torch.testing.assert_close(v, z - z.min(1, keepdim=True).values, atol=1e-5, rtol=0)
    assert torch.isfinite(recover_logits(torch.tensor([[1.0, 0.0]]))).all()  # zeros floored, not -inf
    with pytest.raises(ValueError, match="logit_correction"):
        recover_logits(z, "max")


def test_attacks_dfme_zeroth_order_gradient_follows_the_true_gradient():
    """The forward-difference estimate must point along the true gradient of the objective at
    tanh(x_pre) (a sign or scaling slip would show here)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 64, generator=g)

    def objective(images):  # a smooth nonlinear stand-in for -|S(x) - v(x)|
        return -torch.nn.functional.softplus(images.flatten(1) @ a.T).sum(1)

    x_pre = torch.randn(4, 1, 8, 8, generator=g)
    leaf = x_pre.clone().requires_grad_(True)
    objective(torch.tanh(leaf)).sum().backward()
    true = leaf.grad.flatten(1)
    calls = []
    est, values = zeroth_order_gradient(lambda p: calls.append(len(p)) or objective(p), x_pre, m=400,
                                        epsilon=1e-3, generator=g)
    assert calls == [4 * 401]  # one call with every point: n * (m + 1) queries
    torch.testing.assert_close(values, objective(torch.tanh(x_pre)))
    cosine = torch.nn.functional.cosine_similarity(est.flatten(1), true, dim=1)
    assert (cosine > 0.7).all(), cosine
    ratio = est.flatten(1).norm(dim=1) / true.norm(dim=1)  # unbiased: d * E[u u^T] = I
    assert ((ratio > 0.6) & (ratio < 1.6)).all(), ratio


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_attacks_generator_shapes_and_range(shape):
    gen = GeneratorA(nz=16, ngf=8, out_channels=shape[0], image_size=shape[1])
    x = gen(torch.randn(5, 16))
    assert x.shape == (5, *shape) and x.abs().max() < 1
    pre = gen(torch.randn(5, 16), pre_activation=True)
    assert pre.shape == (5, *shape) and pre.abs().max() > 1  # BatchNorm output, before tanh
    with pytest.raises(ValueError, match="multiple of 4"):
        GeneratorA(image_size=30)


# -- JBDA and JBDA-TR ---------------------------------------------------------------------------
class Linear2(nn.Module):
    """Two-class linear model on 1x4x4 images: logits (w.x, -w.x)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, 16).view(1, 1, 4, 4))

    def forward(self, x):
        s = (x * self.w).sum((1, 2, 3))
        return torch.stack([s, -s], dim=1)


def test_attacks_jbda_step_follows_the_labels_jacobian_sign_and_flips_every_tau():
    data = noise_data(8, (1, 4, 4))
    attack = JBDA(data, num_seeds=4, tau=3, progress=False)
    assert [attack._step(r) for r in range(7)] == [0.1, 0.1, 0.1, -0.1, -0.1, -0.1, 0.1]
    assert JBDA(data, num_seeds=4, tau=None)._step(5) == 0.1
    model, x = Linear2(), data.images[:6] * 0.5
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    new = attack._augment(model, x, labels, rho=0, generator=torch.Generator())
    expected_sign = torch.where(labels[:, None, None, None] == 0, 1.0, -1.0) * model.w.detach().sign()
    torch.testing.assert_close(new, (x + 0.1 * expected_sign).clamp(-1, 1))
    margin = lambda z, y: z.gather(1, y[:, None]).squeeze(1) - z.gather(1, 1 - y[:, None]).squeeze(1)  # noqa: E731
    assert (margin(model(new), labels) > margin(model(x), labels)).all()  # towards the label's class
    edge = attack._augment(model, torch.ones(2, 1, 4, 4), torch.tensor([0, 1]), 0, torch.Generator())
    assert edge.min() >= -1 and edge.max() <= 1


def test_attacks_jbda_tr_moves_towards_a_random_other_class():
    """With two classes the random target is the other class; the step must move towards it
    (the sign slip of one reference code would move away)."""
    data = noise_data(8, (1, 4, 4))
    attack = JBDATR(data, num_seeds=4, progress=False)
    assert attack.tau is None and attack.kappa == 500
    model, x = Linear2(), data.images[:6] * 0.5
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    new = attack._augment(model, x, labels, rho=0, generator=torch.Generator().manual_seed(0))
    target = 1 - labels
    gap = lambda z: z.gather(1, target[:, None]).squeeze(1) - z.gather(1, labels[:, None]).squeeze(1)  # noqa: E731
    assert (gap(model(new)) > gap(model(x))).all()
    torch.testing.assert_close((new - x).abs(), torch.full_like(x, 0.1))


def test_attacks_jbda_reservoir_caps_growth():
    data = noise_data(64, (1, 16, 16), k=2)
    api = Guard(random_victim((1, 16, 16), k=2))
    attack = JBDA(data, num_seeds=8, sigma=2, kappa=5, epochs=1, progress=False)
    result = attack.run(api, 8 + 8 + 16 + 5 + 5 + 3)
    assert result.details["added_per_round"] == [8, 8, 16, 5, 5, 3]  # doubling, then kappa, then the rest


# -- Knockoff -----------------------------------------------------------------------------------
def test_attacks_knockoff_rewards_on_hand_cases():
    state = _RewardState(3)
    y = torch.tensor([[0.7, 0.2, 0.1]])
    assert state.cert(y).item() == pytest.approx(0.5)
    assert state.div(y).item() == pytest.approx(0.0)  # the first answer is the running mean
    y2 = torch.tensor([[0.1, 0.2, 0.7]])
    # running mean (0.4, 0.2, 0.4): only the third class is above it, by 0.3
    assert state.div(y2).item() == pytest.approx(0.3)
    q = torch.tensor([[0.5, 0.25, 0.25]])
    expected = -(0.7 * torch.log(torch.tensor(0.5)) + 0.3 * torch.log(torch.tensor(0.25)))
    assert _RewardState.loss(y, q).item() == pytest.approx(expected.item(), rel=1e-6)
    all_state = _RewardState(3)
    first = all_state.reward("all", y, q)  # first step: each term clipped to [0, 1], averaged
    assert first == pytest.approx((0.5 + 0.0 + min(expected.item(), 1.0)) / 3)


def test_attacks_knockoff_adaptive_bandit_prefers_the_rewarding_class():
    """Proxy class 0 (bright images) gets confident answers, class 1 (dark) uncertain ones: with the
    ``cert`` reward the policy must learn to pull class 0."""

    def victim(x):
        bright = (x.mean((1, 2, 3)) > 0).float()[:, None]
        return bright * torch.tensor([0.98, 0.01, 0.01]) + (1 - bright) * torch.tensor([0.34, 0.33, 0.33])

    n = 40
    imgs = torch.cat([torch.full((n, 1, 16, 16), 0.5), torch.full((n, 1, 16, 16), -0.5)])
    proxy = ImageDataset("toy", "train", imgs, torch.cat([torch.zeros(n), torch.ones(n)]).long(),
                         ("bright", "dark"), False)
    api = Guard(victim, image_shape=(1, 16, 16), num_classes=3)
    attack = KnockoffNets(proxy, strategy="adaptive", reward="cert", query_batch_size=1, epochs=1,
                          substitute_arch="lenet5", seed=0, progress=False)
    result = attack.run(api, 150)
    assert result.queries == 150 and result.details["steps"] == 150
    assert result.details["pulls"]["bright"] > 2 * result.details["pulls"]["dark"]
    assert result.details["policy"]["bright"] > 0.9


# -- the normal user ----------------------------------------------------------------------------
def test_attacks_normal_user_sends_test_images_exactly():
    data = noise_data(20, (1, 16, 16))
    api = Guard(random_victim((1, 16, 16), k=2), budget=50, record_inputs=True)
    traffic = NormalUser(data, query_batch_size=7, seed=1).run(api, 50)
    assert traffic.queries == 50 == api.queries_used(traffic.client) and traffic.client == "normal"
    assert torch.equal(api.inputs("normal"), data.images[traffic.indices])
    assert sorted(traffic.indices[:20].tolist()) == list(range(20))  # without replacement first
    assert torch.equal(traffic.indices, NormalUser(data, seed=1).indices(50))


# -- the substitute benchmark -------------------------------------------------------------------
def test_attacks_substitute_benchmark_rows_and_table():
    victim = random_victim((1, 16, 16), k=2)
    data = noise_data(40, (1, 16, 16))
    options = {"knockoff": {"epochs": 1}, "dfme": {"batch_size": 4, "nz": 8, "ngf": 8}}
    rows = run_substitute_benchmark(victim, data, ["knockoff", "dfme"], [25], seed=0, proxy=data,
                                    options=options, progress=False)
    assert [(r["attack"], r["budget"], r["queries"]) for r in rows] == [("knockoff", 25, 25), ("dfme", 25, 25)]
    assert all(0 <= r["fidelity"] <= 1 and 0 <= r["substitute_accuracy"] <= 1 for r in rows)
    labels_rows = run_substitute_benchmark(victim, data, ["knockoff", "dfme"], [25], proxy=data,
                                           options=options, output="labels", progress=False)
    assert [r["attack"] for r in labels_rows] == ["knockoff"]  # DFME needs probabilities: skipped
    table = format_table([{"attack": "jbda", "budget": 100, "queries": 100, "substitute_accuracy": 0.5,
                           "fidelity": 0.75, "victim_accuracy": 0.9, "seconds": 1.234}])
    assert table.splitlines()[0] == ("| attack | budget | queries used | substitute accuracy | fidelity "
                                     "| victim accuracy | seconds |")
    assert table.splitlines()[2] == "| jbda | 100 | 100 | 0.5000 | 0.7500 | 0.9000 | 1.2 |"
    with pytest.raises(ValueError, match="seeds_data"):
        run_substitute_benchmark(victim, data, ["jbda"], [10])
