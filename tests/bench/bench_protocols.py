"""``python -m tests.bench protocols``: what each linear-probe protocol reports on the same cached features.

The setup of the converged-probe issue: CIFAR-10, 500 training images per class (5,000) and the
10,000 test images, ``32x32_small`` at b=8, t=25, features pooled 2x2; once with the bundled trained
checkpoint and once with random weights (fan-in, seed 0). Each protocol's top-1 and seconds are
printed: the paper's default (SGD 1e-2, 28 epochs, StepLR 7), Adam 1e-3, a one-pass SGD lr grid
chosen on held-out rows, and the converged probe (standardised L-BFGS, L2 chosen on held-out rows).
"""

from __future__ import annotations

import os
import tempfile

from extract.backbone.configs import bundled_checkpoint
from pipeline.cluster import open_runner
from pipeline.evaluate import CacheSelection, FitProtocol, ProbeRequest, run_probe
from pipeline.extraction import ExtractionRequest, plan_extraction
from pipeline.extraction_run import run_extraction

PROTOCOLS = (
    ("paper default: sgd 1e-2", dict(solver="sgd", lr=(1e-2,))),
    ("adam 1e-3", dict(solver="adam", lr=(1e-3,))),
    ("one-pass sgd grid 1e-2..1", dict(solver="sgd", lr=(1e-2, 3e-2, 1e-1, 3e-1, 1.0))),
    ("converged (lbfgs)", dict(solver="lbfgs")),
)


def bench_protocols(cache_dir: str | None = None, block: int = 8, t: int = 25, train_per_class: int = 500) -> list[str]:
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "diffrep-bench-protocols")
    backbones = [("random weights (seed 0)", None)]
    if bundled_checkpoint("32x32_small"):
        backbones.insert(0, ("trained (bundled)", bundled_checkpoint("32x32_small")))
    lines = [f"protocols: cifar10 {train_per_class}/class train, all test, 32x32_small b={block} t={t} pool 2"]
    for name, checkpoint in backbones:
        plans = [plan_extraction(ExtractionRequest(dataset="cifar10", split=split, timesteps=(t,), blocks=(block,),
                                                   cache_dir=cache_dir, pool=2, config_name="32x32_small",
                                                   checkpoint=checkpoint, per_class=per_class))
                 for split, per_class in (("train", train_per_class), ("test", None))]
        with open_runner(synchronous=True) as runner:
            for plan in plans:
                if plan.jobs:
                    run_extraction(plan, runner, progress=False)
        cache = CacheSelection(dataset="cifar10", cache_dir=cache_dir, config_name="32x32_small",
                               backbone_id=plans[0].spec.backbone_id,
                               results_path=os.path.join(cache_dir, "results.parquet"))
        for label, options in PROTOCOLS:
            row = run_probe(ProbeRequest(cache=cache, blocks=(block,), timesteps=(t,), pool=2, progress=False,
                                         checkpoint_dir=os.path.join(cache_dir, "ckpt", f"{name}-{label}"),
                                         protocol=FitProtocol(**options)))
            chosen = f"L2 {row['l2']:g}" if row.get("l2") is not None else f"lr {row['lr']:g}"
            lines.append(f"  {name:26s} {label:28s} top-1 {100 * row['top1']:5.1f}%   {row['train_seconds']:6.1f} s"
                         f"   ({chosen}, held out {row['heldout_size']})")
    return lines
