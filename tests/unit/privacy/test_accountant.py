"""Accountant values against published references, and the privacy ledger's budget logic."""

from __future__ import annotations

import math

import msgpack
import pytest

from fanomad_stream.privacy.accountant import (
    GaussianSteps,
    PrivacyLedger,
    client_sampling_rate,
    compute_epsilon,
    dpsgd_sampling_rate,
    epsilon_for,
)


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "accountant", "expected"),
    [
        (1.1, 0.01, 10_000, "pld", 5.19),
        (1.1, 0.01, 10_000, "rdp", 5.63),
        (1.1, 1.0, 100, "pld", 79.28),
        (1.0, 0.1, 100, "pld", 4.78),
    ],
    ids=["A-pld", "A-rdp", "full-batch-gaussian", "fl-q0.1"],
)
def test_epsilon_matches_reference(
    sigma: float, q: float, steps: int, accountant: str, expected: float
) -> None:
    """ε reproduces the published dp-accounting / analytic Gaussian values to 0.01."""
    epsilon = compute_epsilon(
        noise_multiplier=sigma,
        sampling_rate=q,
        steps=steps,
        delta=1e-5 if q != 0.1 else 1e-3,
        accountant=accountant,  # type: ignore[arg-type]
    )
    assert epsilon == pytest.approx(expected, abs=0.01)


def test_rdp_bounds_pld_from_above() -> None:
    """The RDP cross-check is never below the tight PLD figure."""
    kwargs = {"noise_multiplier": 1.1, "sampling_rate": 0.01, "steps": 1000, "delta": 1e-5}
    assert compute_epsilon(**kwargs, accountant="rdp") >= compute_epsilon(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_zero_noise_is_infinite(accountant: str) -> None:
    """σ = 0 gives ε = ∞, never a finite number."""
    epsilon = compute_epsilon(
        noise_multiplier=0.0,
        sampling_rate=0.01,
        steps=10,
        delta=1e-5,
        accountant=accountant,  # type: ignore[arg-type]
    )
    assert math.isinf(epsilon)


def test_zero_noise_step_poisons_composition() -> None:
    """One noiseless round among noised ones makes the whole composition ε = ∞."""
    steps = [GaussianSteps(1.0, 0.1, 10), GaussianSteps(0.0, 1.0, 1)]
    assert math.isinf(epsilon_for(steps, delta=1e-5))


def test_full_batch_rounds_merge_exactly() -> None:
    """Splitting q = 1 rounds into parts with different σ equals the single merged Gaussian."""
    split = [GaussianSteps(1.1, 1.0, 60), GaussianSteps(2.0, 1.0, 40)]
    merged_sigma = (60 / 1.1**2 + 40 / 2.0**2) ** -0.5
    whole = compute_epsilon(noise_multiplier=merged_sigma, sampling_rate=1.0, steps=1, delta=1e-5)
    assert epsilon_for(split, delta=1e-5) == pytest.approx(whole, rel=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (
            {"noise_multiplier": -0.5, "sampling_rate": 0.1, "steps": 1, "delta": 1e-5},
            "noise_multiplier",
        ),
        (
            {"noise_multiplier": 1.0, "sampling_rate": 0.0, "steps": 1, "delta": 1e-5},
            "sampling_rate",
        ),
        (
            {"noise_multiplier": 1.0, "sampling_rate": 1.5, "steps": 1, "delta": 1e-5},
            "sampling_rate",
        ),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 1, "delta": 0.0}, "delta"),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 1, "delta": 1.0}, "delta"),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": -1, "delta": 1e-5}, "count"),
    ],
)
def test_invalid_parameters_rejected(kwargs: dict[str, float], fragment: str) -> None:
    """Out-of-domain privacy parameters raise ValueError naming the parameter."""
    with pytest.raises(ValueError, match=fragment):
        compute_epsilon(**kwargs)  # type: ignore[arg-type]


def test_sampling_rates() -> None:
    """Client and record sampling rates are cohort/population and batch/records."""
    assert client_sampling_rate(cohort_size=10, population=100) == 0.1
    assert dpsgd_sampling_rate(batch_size=64, num_records=6400) == 0.01
    with pytest.raises(ValueError, match="cohort_size"):
        client_sampling_rate(cohort_size=11, population=10)


class TestPrivacyLedger:
    def test_spent_grows_with_rounds(self) -> None:
        """ε after two rounds exceeds ε after one, and equals the direct computation."""
        ledger = PrivacyLedger(delta=1e-3)
        assert ledger.spent_epsilon() == 0.0
        ledger.record_round(round_id=0, noise_multiplier=1.0, sampling_rate=0.1)
        first = ledger.spent_epsilon()
        ledger.record_round(round_id=1, noise_multiplier=1.0, sampling_rate=0.1)
        second = ledger.spent_epsilon()
        assert 0 < first < second
        direct = compute_epsilon(noise_multiplier=1.0, sampling_rate=0.1, steps=2, delta=1e-3)
        assert second == pytest.approx(direct, rel=1e-9)

    def test_budget_stops_before_exceeding(self) -> None:
        """check_next_round refuses the round that would cross the budget, with a reason."""
        ledger = PrivacyLedger(delta=1e-5, epsilon_budget=2.0, subject="model")
        rounds = 0
        while ledger.check_next_round(noise_multiplier=5.0, sampling_rate=1.0).allowed:
            ledger.record_round(round_id=rounds, noise_multiplier=5.0, sampling_rate=1.0)
            rounds += 1
            assert rounds < 1000
        decision = ledger.check_next_round(noise_multiplier=5.0, sampling_rate=1.0)
        assert ledger.spent_epsilon() <= 2.0
        assert decision.projected_epsilon > 2.0
        assert "budget" in decision.reason
        assert rounds > 0

    def test_ledger_body_is_msgpack_ready(self) -> None:
        """The ledger body round-trips through msgpack with the documented keys."""
        ledger = PrivacyLedger(
            delta=1e-5, epsilon_budget=8.0, subject="client:edge-1", level="sample"
        )
        ledger.record_round(round_id=3, noise_multiplier=1.1, sampling_rate=0.01, steps=50)
        body = ledger.ledger_body()
        decoded = msgpack.unpackb(msgpack.packb(body))
        assert set(decoded) == {"round", "epsilon", "delta", "accountant", "params"}
        assert decoded["round"] == 3
        assert decoded["accountant"] == "pld"
        assert decoded["params"]["epsilon_rdp"] >= decoded["epsilon"]
        assert decoded["params"]["steps"] == 50

    @pytest.mark.parametrize("budget", [0.0, -1.0, float("nan")])
    def test_invalid_budget_rejected(self, budget: float) -> None:
        """A budget that is not > 0 raises ValueError."""
        with pytest.raises(ValueError, match="epsilon_budget"):
            PrivacyLedger(delta=1e-5, epsilon_budget=budget)


def test_analytic_gaussian_agrees_with_pld_library() -> None:
    """The exact full-batch ε matches dp-accounting's PLD on the same composed Gaussian."""
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.pld import PLDAccountant

    library = PLDAccountant()
    library.compose(SelfComposedDpEvent(GaussianDpEvent(3.0), 20))
    expected = library.get_epsilon(1e-5)
    ours = compute_epsilon(noise_multiplier=3.0, sampling_rate=1.0, steps=20, delta=1e-5)
    assert ours == pytest.approx(expected, abs=0.01)
