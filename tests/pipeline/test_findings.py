"""The report's finding sentences follow the numbers: a table where a finding fails says so."""

import pytest

from pipeline.findings import check_findings, findings_paragraph


def _grid(best):
    """Linear top-1 over blocks 5..15 x timesteps 5..400, peaking at ``best``."""
    blocks, timesteps = (5, 8, 10, 12, 15), (5, 25, 50, 100, 400)
    return {(b, t): 0.5 - 0.01 * abs(blocks.index(b) - blocks.index(best[0])) - 0.01 * abs(timesteps.index(t) - timesteps.index(best[1]))
            for b in blocks for t in timesteps}


def _by_name(findings):
    return {f.name: f for f in findings}


def test_findings_that_hold_say_so():
    grid = _grid((10, 50))
    found = _by_name(check_findings(grid, attention={(10, 50): 0.6}, floors={"random init": 0.4, "pixels": 0.35}))
    assert found["mid timesteps best"].held and "held. The best timestep is t=50 (50.0%" in found["mid timesteps best"].sentence
    assert found["middle blocks best"].held and "b=10" in found["middle blocks best"].sentence
    assert found["attention head over linear"].held and "60.0% against 50.0%" in found["attention head over linear"].sentence
    assert found["pretrained over random init"].held and "+10.0 points" in found["pretrained over random init"].sentence
    assert found["DifFormer over attention"].held is None and "not measured" in found["DifFormer over attention"].sentence


def test_findings_that_fail_say_so():
    grid = _grid((5, 5))  # best at the first block and the least noise
    found = _by_name(check_findings(grid, attention={(5, 5): 0.45}, floors={"random init": 0.55}))
    for name in ("mid timesteps best", "middle blocks best", "attention head over linear", "pretrained over random init"):
        assert found[name].held is False and "did not hold" in found[name].sentence, name
    assert "-5.0 points" in found["pretrained over random init"].sentence
    assert "t=5" in found["mid timesteps best"].sentence


def test_fusion_findings_when_measured():
    found = _by_name(check_findings(_grid((10, 50)), attention={(10, 50): 0.6}, difformer=0.58, diffeed=0.65))
    assert found["DifFormer over attention"].held is False and found["DifFeed over attention"].held is True
    assert "did not hold (58.0% against 60.0%)" in found["DifFormer over attention"].sentence


def test_paragraph_joins_every_sentence_and_empty_input_is_refused():
    findings = check_findings(_grid((10, 50)))
    assert findings_paragraph(findings).count("Mid timesteps best") == 1 and len(findings) == 6
    with pytest.raises(ValueError):
        check_findings({})
