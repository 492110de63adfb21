"""FedProx client side: the proximal term, its gradient, and its effect on training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fanomad_stream.detect.autoencoder import build_model, get_weights, set_weights
from fanomad_stream.federate.aggregate import Weights
from fanomad_stream.federate.fedprox import proximal_term, snapshot_parameters
from fanomad_stream.federate.strategies import FedAvg, FedProx, Strategy

N_FEATURES = 4


def _client_data(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(loc=seed, scale=1.0, size=(32, N_FEATURES)).astype(np.float32)


def _train_local(global_weights: Weights, data: np.ndarray, mu: float | None) -> Weights:
    """Train with plain SGD from the global weights; None leaves the proximal term out."""
    model = build_model(N_FEATURES, [3], seed=0)
    set_weights(model, global_weights)
    anchor = snapshot_parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batch = torch.from_numpy(data)
    for _ in range(20):
        loss = (model(batch) - batch).pow(2).mean()
        if mu is not None:
            loss = loss + proximal_term(model, anchor, mu)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = get_weights(model)
    return {name: trained[name] - global_weights[name] for name in trained}


def _federated_round(strategy: Strategy, mu: float | None) -> Weights:
    global_weights = get_weights(build_model(N_FEATURES, [3], seed=0))
    strategy.begin_round(global_weights)
    for seed, n_samples in ((1, 32.0), (2, 16.0)):
        strategy.fold(_train_local(global_weights, _client_data(seed), mu), n_samples)
    return strategy.finish_round()


def _moved_model() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = build_model(N_FEATURES, [3], seed=0)
    anchor = snapshot_parameters(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator))
    return model, anchor


class TestProximalTerm:
    def test_term_zero_before_training(self) -> None:
        """At the global weights the term is exactly 0."""
        model = build_model(N_FEATURES, [3], seed=0)
        assert float(proximal_term(model, snapshot_parameters(model), 0.5).detach()) == 0.0

    def test_term_positive_when_moved(self) -> None:
        """Moving every parameter by 0.1 gives mu/2 * (parameter count * 0.01) > 0."""
        model = build_model(N_FEATURES, [3], seed=0)
        anchor = snapshot_parameters(model)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.1)
        count = sum(param.numel() for param in model.parameters())
        term = float(proximal_term(model, anchor, 0.5).detach())
        assert term > 0.0
        assert math.isclose(term, 0.5 * 0.5 * count * 0.01, rel_tol=1e-5)

    def test_gradient_is_mu_times_drift(self) -> None:
        """The gradient of the term with respect to each parameter is mu * (w - w_global)."""
        model, anchor = _moved_model()
        proximal_term(model, anchor, 0.3).backward()  # type: ignore[no-untyped-call]
        for name, param in model.named_parameters():
            assert param.grad is not None
            expected = 0.3 * (param.detach() - anchor[name])
            torch.testing.assert_close(param.grad, expected, rtol=1e-6, atol=1e-7)

    def test_global_copy_gets_no_gradient(self) -> None:
        """The global weights are detached, even when passed with requires_grad set."""
        model, anchor = _moved_model()
        anchor = {name: tensor.clone().requires_grad_(True) for name, tensor in anchor.items()}
        proximal_term(model, anchor, 1.0).backward()  # type: ignore[no-untyped-call]
        assert all(tensor.grad is None for tensor in anchor.values())

    def test_missing_parameter_rejected(self) -> None:
        """A global copy without one of the model's parameters raises ValueError naming it."""
        model, anchor = _moved_model()
        name = next(iter(anchor))
        del anchor[name]
        with pytest.raises(ValueError, match=name):
            proximal_term(model, anchor, 1.0)

    @pytest.mark.parametrize("mu", [-1.0, math.nan, math.inf])
    def test_invalid_mu_rejected(self, mu: float) -> None:
        """mu must be a finite number >= 0."""
        model, anchor = _moved_model()
        with pytest.raises(ValueError, match="mu"):
            proximal_term(model, anchor, mu)


class TestFedProxTraining:
    def test_mu_zero_equals_fedavg(self) -> None:
        """FedProx with mu = 0 trains and aggregates bit for bit as FedAvg does."""
        fedavg = _federated_round(FedAvg(), mu=None)
        fedprox = _federated_round(FedProx(proximal_mu=0.0), mu=0.0)
        for name in fedavg:
            np.testing.assert_array_equal(fedprox[name], fedavg[name])

    def test_different_mu_different_models(self) -> None:
        """Each mu gives another model, and a larger mu keeps the local model nearer."""
        global_weights = get_weights(build_model(N_FEATURES, [3], seed=0))
        data = _client_data(1)
        drifts = {}
        for mu in (0.0, 0.5, 5.0):
            delta = _train_local(global_weights, data, mu)
            drifts[mu] = math.sqrt(sum(float(np.sum(np.square(a))) for a in delta.values()))
        assert drifts[0.0] != drifts[0.5]
        assert drifts[0.5] != drifts[5.0]
        assert drifts[0.0] > drifts[0.5] > drifts[5.0] > 0.0
