"""The paper's findings, checked against one run's numbers and written as sentences that follow them.

Each check reads measured accuracies and says whether the finding held, with the numbers that
decide it; nothing is asserted to match the paper. The demo's report prints these sentences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Finding", "check_findings"]

Grid = Mapping[tuple[int, int], float]  # (b, t) -> top-1 (fraction)


@dataclass(frozen=True)
class Finding:
    """One finding of the paper: its name, whether it held here (None: not measured), and the sentence."""

    name: str
    held: bool | None
    sentence: str


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _best(grid: Grid) -> tuple[tuple[int, int], float]:
    key = max(grid, key=lambda k: (grid[k], -k[1], -k[0]))
    return key, grid[key]


def _interior(grid: Grid, axis: int) -> tuple[list[int], dict[int, float], int, bool | None]:
    """Along one axis (0: blocks, 1: timesteps): the values, the best top-1 per value over the other axis,
    the best value, and whether it lies strictly inside the range (None with fewer than three values)."""
    values = sorted({key[axis] for key in grid})
    best_of = {v: max(top1 for key, top1 in grid.items() if key[axis] == v) for v in values}
    best = max(values, key=lambda v: (best_of[v], -v))
    return values, best_of, best, (values[0] < best < values[-1]) if len(values) >= 3 else None


def _mid_timesteps(grid: Grid) -> Finding:
    ts, by_t, best, held = _interior(grid, 1)
    if held is None:
        return Finding("mid timesteps best", None, "Mid timesteps best: not measured (fewer than three timesteps).")
    return Finding("mid timesteps best", held,
                   f"Mid timesteps best: {'held' if held else 'did not hold'}. The best timestep is t={best} "
                   f"({_pct(by_t[best])}, best block), against {_pct(by_t[ts[0]])} at the least noise (t={ts[0]}) "
                   f"and {_pct(by_t[ts[-1]])} at the most (t={ts[-1]}).")


def _middle_blocks(grid: Grid) -> Finding:
    bs, by_b, best, held = _interior(grid, 0)
    if held is None:
        return Finding("middle blocks best", None, "Middle blocks best: not measured (fewer than three blocks).")
    return Finding("middle blocks best", held,
                   f"Middle blocks best: {'held' if held else 'did not hold'}. The best block is b={best} "
                   f"({_pct(by_b[best])}, best timestep), against {_pct(by_b[bs[0]])} at b={bs[0]} and "
                   f"{_pct(by_b[bs[-1]])} at b={bs[-1]}.")


def _head_over_linear(name: str, head: float | None, linear: float, key: tuple[int, int]) -> Finding:
    if head is None:
        return Finding(f"{name} head over linear", None, f"{name.capitalize()} head over linear: not measured.")
    held = head > linear
    verdict = "held" if held else "did not hold"
    return Finding(f"{name} head over linear", held,
                   f"{name.capitalize()} head over linear: {verdict}. At b={key[0]}, t={key[1]} the {name} head reaches "
                   f"{_pct(head)} against {_pct(linear)} for the linear probe.")


def _fusion(name: str, fused: float | None, attention: float | None, missing: str) -> Finding:
    if fused is None or attention is None:
        return Finding(f"{name} over attention", None, f"{name} over the attention head: not measured ({missing}).")
    held = fused > attention
    verdict = "held" if held else "did not hold"
    return Finding(f"{name} over attention", held,
                   f"{name} over the attention head: {verdict} ({_pct(fused)} against {_pct(attention)}).")


def _pretrained(best: float, floors: Mapping[str, float]) -> Finding:
    if not floors:
        return Finding("pretrained over random init", None, "Pretrained over random init: not measured.")
    worst_gap = min(best - value for value in floors.values())
    held = worst_gap > 0
    verdict = "held" if held else "did not hold"
    parts = ", ".join(f"{name} {_pct(value)}" for name, value in floors.items())
    return Finding("pretrained over random init", held,
                   f"Pretrained over random init: {verdict}. The trained backbone's best linear probe reaches "
                   f"{_pct(best)}; the floors on the same probe: {parts} ({100 * worst_gap:+.1f} points over the "
                   f"highest floor).")


def check_findings(linear: Grid, *, attention: Mapping[tuple[int, int], float] | None = None,
                   floors: Mapping[str, float] | None = None, difformer: float | None = None,
                   diffeed: float | None = None, fusion_missing: str = "the fusion methods are not built yet"
                   ) -> list[Finding]:
    """The paper's findings against one run.

    Args:
        linear: linear-probe top-1 per (b, t) (best pool of each).
        attention: attention-head top-1 per (b, t) where it was trained.
        floors: the same probe on other representations, e.g. ``{"random init (fan-in)": 0.41, "pixels": 0.37}``.
        difformer, diffeed: fusion top-1 where measured. fusion_missing: why they are absent otherwise.

    Returns:
        One :class:`Finding` per finding: mid timesteps, middle blocks, attention over linear,
        DifFormer and DifFeed over attention, pretrained over random init.
    """
    if not linear:
        raise ValueError("no linear-probe results to check the findings against")
    key, best = _best(linear)
    attention = attention or {}
    att_key = next((k for k in attention if k == key), None) or (next(iter(attention)) if attention else None)
    attention_top1 = attention.get(att_key) if att_key else None
    return [
        _mid_timesteps(linear),
        _middle_blocks(linear),
        _head_over_linear("attention", attention_top1, linear.get(att_key, best) if att_key else best, att_key or key),
        _fusion("DifFormer", difformer, attention_top1, fusion_missing),
        _fusion("DifFeed", diffeed, attention_top1, fusion_missing),
        _pretrained(best, dict(floors or {})),
    ]


def findings_paragraph(findings: Sequence[Finding]) -> str:
    """The sentences as one Markdown paragraph."""
    return " ".join(f.sentence for f in findings)
