"""Shared pytest setup: headless plotting, deterministic seeds, and the fault-injection tally.

Reliability tests record every fault they inject through the ``fault_tally`` fixture::

    def test_nan_in_loss(fault_tally):
        ...
        fault_tally.record("callbacks", "nan loss @ step 3, bf16-mixed", outcome="survived")

and the suite prints a summary table at the end (faults injected, survived, stopped cleanly).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

OUTCOMES = ("survived", "stopped")


@dataclass
class FaultTally:
    """Faults injected by the reliability tests and what became of the run."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def record(self, capability: str, fault: str, outcome: str) -> None:
        """Record one injected fault.

        Args:
            capability: what was under test (``optim``, ``callbacks``, ``lm``, ``diffusion``, ...).
            fault: what was injected, where and when.
            outcome: ``"survived"`` (the run continued correctly) or ``"stopped"`` (it stopped with an error
                naming the cause and the step).
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        self.rows.append((capability, fault, outcome))


_TALLY = FaultTally()


@pytest.fixture
def fault_tally() -> FaultTally:
    return _TALLY


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TALLY.rows:
        return
    per_cap: dict[str, Counter] = {}
    for capability, _, outcome in _TALLY.rows:
        per_cap.setdefault(capability, Counter())[outcome] += 1
    tr = terminalreporter
    tr.section("fault injection tally")
    tr.write_line(f"{'capability':<14}{'injected':>10}{'survived':>10}{'stopped cleanly':>17}")
    for capability, counts in sorted(per_cap.items()):
        tr.write_line(f"{capability:<14}{sum(counts.values()):>10}{counts['survived']:>10}{counts['stopped']:>17}")
    total = Counter(outcome for _, _, outcome in _TALLY.rows)
    tr.write_line(f"{'total':<14}{len(_TALLY.rows):>10}{total['survived']:>10}{total['stopped']:>17}")
