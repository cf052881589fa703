"""``make bench``: the performance figures of diffrep, measured as ratios in one run (never asserted in tests)."""
