"""Differential privacy and secure aggregation for model updates.

- ``dp``: clipping, DP-FedAvg noise (central or as per-client shares) and adaptive clipping.
- ``dpsgd``: sample-level DP-SGD with per-record gradients from ``torch.func``.
- ``accountant``: (ε, δ) from dp-accounting (PLD reported, RDP as a cross-check) and the
  per-subject ``PrivacyLedger`` with its budget check.
- ``secagg``: double-masking secure aggregation as pure client and server state machines.
"""
