"""The headline section of ``make bench`` runs end to end on a tiny subset: both protocols, the ratios and the ImageNet figure."""

import re

from tests.bench.bench_headline import bench_headline


def test_headline_section_dry_run(cifar10_root):
    lines = bench_headline(train_per_class=4, test_per_class=2, epochs=2, block=4, timestep=25)
    text = "\n".join(lines)
    assert re.search(r"ratio, live / \(extract \+ cached probe\): [\d.]+x wall, [\d.]+x CPU", text), text
    assert re.search(r"each further head: [\d.]+ s on the cache vs [\d.]+ s live", text), text
    # the FLOP-level figure is the block table's alone: 2 epochs of full forwards against one forward to b=24
    from extract.backbone.block_table import block_table

    rows = {r.b: r for r in block_table("256x256_uncond")}
    expected = 2 * rows[0].flops_cum / rows[24].flops_cum
    assert f"FLOP level {expected:.0f}x" in text, text
