"""Checks FINN does not make: does the estimate fit the board's part, and does it meet the latency budget."""

from __future__ import annotations

from pfq_edge.errors import ProfileError
from pfq_edge.targets.backends.finn.driver import RESOURCES
from pfq_edge.targets.backends.finn.zero_estimates import unexplained_zeros

CAPACITY_FIELDS = ("LUT", "FF", "BRAM_18K", "URAM", "DSP")


def board_capacity(board: str) -> dict[str, int]:
    """Resources of ``board``'s FPGA from FINN's platform table (finn.util.platforms), e.g. Pynq-Z1 → 53,200 LUT.

    Raises ProfileError naming the known boards if FINN does not know ``board``.
    """
    from finn.util.platforms import platforms

    if board not in platforms:
        raise ProfileError(f"unknown FPGA board {board!r}; FINN knows: {', '.join(sorted(platforms))}")
    return dict(zip(CAPACITY_FIELDS, platforms[board]().compute_resources[0]))


def check_fpga_profile(profile) -> None:
    """Before any work: FINN must know the profile's board (for its capacity), and the part must be that board's.

    Raises ProfileError naming the key and the profile file.
    """
    from finn.util.basic import part_map

    where = f" in {profile.source}" if profile.source else ""
    try:
        board_capacity(profile.fpga.board)
    except ProfileError as exc:
        raise ProfileError(f"key 'fpga.board'{where}: {exc}") from None
    expected = part_map.get(profile.fpga.board)
    if expected is not None and expected != profile.fpga.part:
        raise ProfileError(f"key 'fpga.part'{where}: {profile.fpga.part!r} is not the FPGA of board "
                           f"{profile.fpga.board!r} ({expected})")


def fpga_verdicts(estimate, profile) -> dict:
    """Fit (every resource ≤ max_utilization × capacity) and latency (≤ budget) verdicts for a FinnEstimate.
    A compute core FINN estimated at 0 everywhere makes the fit "estimate incomplete" (``incomplete`` names it);
    zero estimates of other layers are bounded first (zero_estimates.py; ``bounded`` names them).

    Returns {"fit": {"verdict": "fits"|"does not fit"|"estimate incomplete", "utilization": {res: fraction}, ...},
             "latency": {"verdict": "meets"|"misses", "latency_ms", "budget_ms"}}.
    """
    capacity = board_capacity(profile.fpga.board)
    limit = profile.fpga.max_utilization
    utilization = {r: (estimate.totals.get(r, 0.0) / capacity[r]) if capacity[r] else
                   (0.0 if estimate.totals.get(r, 0.0) == 0 else float("inf"))
                   for r in RESOURCES}
    over = [r for r, u in utilization.items() if u > limit]
    incomplete = unexplained_zeros(estimate.layers)
    latency_ms = estimate.latency_us / 1000.0
    verdict = "does not fit" if over else "estimate incomplete" if incomplete else "fits"
    return {
        "fit": {"verdict": verdict, "board": profile.fpga.board,
                "part": profile.fpga.part, "max_utilization": limit, "capacity": capacity,
                "utilization": utilization, "over": over, "incomplete": incomplete,
                "bounded": [b["layer"] for b in estimate.bounded]},
        "latency": {"verdict": "meets" if latency_ms <= profile.budget.latency_ms else "misses",
                    "latency_ms": latency_ms, "budget_ms": profile.budget.latency_ms},
    }
