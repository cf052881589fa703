"""DifFormer: the official architecture (parameter count, sharing across timesteps), trained through diffrep fuse."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fusion.difformer import DifFormer
from pipeline.cli.main import main
from pipeline.results import read_results
from probe.attention_head import AttentionHeadConfig
from probe.errors import ProbeError
from probe.heads import count_parameters, create_head
from tests.probe.test_features import make_cache

torch.set_num_threads(1)

# b19, b24, b30 of 256x256_uncond as cached at pool 16
SHAPES_256 = {19: (1024, 8, 8), 24: (1024, 16, 16), 30: (512, 16, 16)}


def _expected_parameters(blocks, timesteps, classes, dim=1024, depth=2, mlp=4):
    """Counted from the architecture's definition: tokenizers per block, one transformer, one CLS, the classifier."""
    tokenizers = sum(2 * c * h * w + c * dim + dim for c, h, w in (SHAPES_256[b] for b in blocks))
    block = 2 * 2 * dim + 3 * dim * dim + dim * dim + dim + dim * mlp * dim + mlp * dim + mlp * dim * dim + dim
    return tokenizers + depth * block + dim + dim * len(timesteps) * classes + classes


def test_importing_fusion_registers_difformer_and_probe_alone_does_not():
    """The registry is complete exactly when ``fusion`` is imported: no other import registers its heads."""
    code = ("import probe.heads as heads; alone = 'difformer' in heads.HEADS; import fusion; "
            "print(alone, 'difformer' in heads.HEADS, heads.HEADS['difformer'].builder.__self__ is fusion.DifFormer)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.split() == ["False", "True", "True"]


def test_parameter_count_on_the_256_model_is_the_official_code_s():
    keys = {(b, t): SHAPES_256[b] for b in (19, 24, 30) for t in (90, 150, 300)}
    with torch.device("meta"):
        model = create_head("difformer", keys, 50)
    assert isinstance(model, DifFormer)
    assert count_parameters(model) == _expected_parameters((19, 24, 30), (90, 150, 300), 50)
    assert abs(count_parameters(model) - 28.9e6) < 0.1e6
    assert len(model.tokenizers) == 3 and len(model.blocks) == 2  # per block, not per (b, t); one transformer


def test_one_transformer_runs_once_per_timestep_on_all_blocks_tokens():
    torch.manual_seed(0)
    shapes = {(b, t): (4, 4, 4) for b in (8, 10) for t in (25, 50, 100)}
    model = DifFormer(shapes, 5, AttentionHeadConfig(dim=16, depth=2, num_heads=2, token_pool=4)).eval()
    with torch.no_grad():
        model.cls_token.normal_()
    features = {key: torch.randn(3, 4, 4, 4) for key in shapes}
    cls = []
    for t in (25, 50, 100):  # the definition, written out
        x = torch.cat([model.cls_token.expand(3, -1, -1)] + [model.tokenizers[f"b{b}"](features[(b, t)]) for b in (8, 10)], 1)
        for block in model.blocks:
            x = block(x)
        cls.append(x[:, 0])
    expected = model.fc(torch.cat(cls, 1))
    torch.testing.assert_close(model(features), expected)
    swapped = dict(features)
    swapped[(8, 25)], swapped[(8, 50)] = features[(8, 50)], features[(8, 25)]
    assert not torch.allclose(model(swapped), expected)  # timesteps keep their place in the classifier


def test_every_block_at_every_timestep_is_required():
    with pytest.raises(ProbeError, match="missing b10/t50"):
        DifFormer({(8, 25): (4, 4, 4), (8, 50): (4, 4, 4), (10, 25): (4, 4, 4)}, 3)
    with pytest.raises(ProbeError, match="no option width"):
        create_head("difformer", {(8, 25): (4, 4, 4)}, 3, width=4)


def test_fuse_trains_records_and_names_the_missing_arrays(tmp_path):
    keys = ((24, 90), (24, 150), (19, 90), (19, 150))
    for split, n, seed in (("train", 61, 0), ("test", 31, 1)):
        make_cache(tmp_path / "cache", n=n, keys=keys, split=split, signal=4.0, seed=seed)
    common = ["--dataset", "toy", "--cache-dir", str(tmp_path / "cache"), "--config", "32x32_small",
              "--results", str(tmp_path / "results.parquet"), "--no-progress"]
    result = CliRunner().invoke(main, ["fuse", "-b", "19,24", "-t", "90,150", "--dim", "16", "--depth", "1",
                                       "--epochs", "3", "--solver", "adam", "--lr", "1e-2", "--batch-size", "8",
                                       "--checkpoint-dir", str(tmp_path / "ckpt"), *common])
    assert result.exit_code == 0, result.output
    row = read_results(tmp_path / "results.parquet").to_pylist()[-1]
    assert row["head"] == "difformer" and row["blocks"] == "19,24" and row["timesteps"] == "90,150"
    assert row["top1"] > 0.9
    missing = CliRunner().invoke(main, ["fuse", "-b", "5,19,24", "-t", "90,150,300", *common])
    assert missing.exit_code == 1 and len(missing.output.strip().splitlines()) == 1
    assert ("b5/t90, b5/t150, b5/t300, b19/t300, b24/t300: run diffrep extract --dataset toy --split train "
            "--config 32x32_small --weight-seed 0 --blocks 5,19,24 --timesteps 90,150,300 --pool 4") in missing.output
