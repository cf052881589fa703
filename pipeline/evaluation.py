"""Evaluation runs on cached features: one probe, kNN, CKA matrices, and (b, t, pool) sweeps.

Library functions with plain keyword arguments, called by ``diffrep probe | knn | cka | sweep``
and by the demo; each opens the train/test caches written by ``diffrep extract``, calls the
probe library (``probe.train.fit``, ``probe.knn.knn_classify``, ``probe.cka``), appends its rows
to the results table and returns what it measured. Nothing here knows click.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

Key = tuple[int, int]


def _open_pair(cache_dir, dataset, config_name, backbone_id, train_split, test_split, ram_cap_gb):
    from probe.features import open_split, resolve_backbone_id

    backbone_id = resolve_backbone_id(cache_dir, dataset, train_split, config_name, backbone_id)
    cap = int(ram_cap_gb * 2**30) if ram_cap_gb else None
    train = open_split(cache_dir, dataset, train_split, backbone_id, cap)
    test = open_split(cache_dir, dataset, test_split, backbone_id, cap)
    if list(train.class_names) != list(test.class_names):
        from extract.errors import CacheError

        raise CacheError(f"{train_split} and {test_split} caches of {dataset} have different classes: extract both from one manifest")
    return backbone_id, train, test


def _read_pool(cache, key: Key, pool: int | None) -> int | None:
    """Pool to read at: ``pool`` when the stored maps are larger, else as stored (never finer)."""
    if not pool:
        return None
    return pool if cache.shape(*key)[-1] > pool else None


def _keys(blocks, timesteps) -> list[Key]:
    return [(int(b), int(t)) for b in blocks for t in timesteps]


def fmt_keys(values) -> str:
    return ",".join(str(v) for v in values)


def run_probe(*, dataset, cache_dir, config_name, backbone_id, train_split, test_split, results_path, ram_cap_gb,
              blocks, timesteps, head, pool, hidden, channels, depth, epochs, lr, optimizer, batch_size, seed, device,
              checkpoint_dir, resume, progress, stream=False) -> dict:
    """Train one head on cached train features, score it on the test features, append the row; returns it."""
    import torch

    from extract.precision import resolve_device
    from probe.features import StreamedFeatures, feature_bytes, in_shapes
    from probe.heads import HEADS, count_parameters, create_head, default_lr
    from probe.train import fit

    from .results import append_result, default_results_path

    backbone_id, train_cache, test_cache = _open_pair(cache_dir, dataset, config_name, backbone_id,
                                                      train_split, test_split, ram_cap_gb)
    keys = _keys(blocks, timesteps)
    overrides = {}
    if pool is not None:
        overrides["token_pool" if head == "attention" else "pool"] = pool
    if hidden is not None:
        overrides["hidden"] = hidden
    if channels is not None:
        overrides["channels"] = channels
    if depth is not None:
        overrides["depth"] = depth
    if head == "attention":
        from probe.attention_head import AttentionHeadConfig

        head_pool = overrides.get("token_pool", AttentionHeadConfig().token_pool)
    else:
        head_pool = overrides.get("pool", HEADS[head].defaults["pool"])
    read_pool = {key: _read_pool(train_cache, key, head_pool) for key in keys}
    need = sum(feature_bytes(train_cache, [key], read_pool[key]) for key in keys)
    if stream or need > train_cache.ram_cap_bytes:
        stream_pool = read_pool[keys[0]] if len(set(read_pool.values())) == 1 else None
        log.warning("streaming %s from the cache every epoch (%s: %.2f GiB of float32 features, RAM cap %.1f GiB)",
                    dataset, "--stream" if stream else "over the RAM cap", need / 2**30, train_cache.ram_cap_bytes / 2**30)
        train = StreamedFeatures(train_cache, keys, stream_pool)
        test = StreamedFeatures(test_cache, keys, stream_pool)
        shapes, train_y, test_y = in_shapes(train_cache, keys, stream_pool), None, None
        train_x, test_x = train, test
    else:
        train, test = _load(train_cache, keys, read_pool), _load(test_cache, keys, read_pool)
        shapes = {key: tuple(train.features[key].shape[1:]) for key in keys}
        train_x, train_y, test_x, test_y = train.features, train.labels, test.features, test.labels
    torch.manual_seed(seed)
    module = create_head(head, shapes, len(train.class_names) or len(train_cache.class_names), **overrides)
    lr = lr if lr is not None else default_lr(head)
    if checkpoint_dir is None:
        # every choice that shapes the head is in the name, so --resume finds only a matching checkpoint
        shaped = "".join(f"_{k}{fmt_keys(v) if isinstance(v, (tuple, list)) else v}" for k, v in sorted(overrides.items()))
        name = f"{dataset}_{backbone_id}_{head}_b{fmt_keys(blocks)}_t{fmt_keys(timesteps)}{shaped}_s{seed}"
        checkpoint_dir = Path(results_path or default_results_path()).parent / "checkpoints" / name
    result = fit(module, train_x, train_y, test_x, test_y, epochs=epochs, lr=lr,
                 optimizer=optimizer, batch_size=batch_size, seed=seed, device=resolve_device(device),
                 checkpoint_dir=checkpoint_dir, resume=resume, progress=progress)
    row = dict(dataset=dataset, train_size=train.num_images, test_size=test.num_images, backbone_id=backbone_id,
               head=head, blocks=list(blocks), timesteps=list(timesteps), pool=int(head_pool or 0),
               parameters=count_parameters(module), epochs=epochs, lr=lr, optimizer=optimizer,
               batch_size=batch_size, seed=seed, top1=result.top1, top5=result.top5,
               train_seconds=result.train_seconds)
    append_result(row, results_path)
    return row


def _load(cache, keys, read_pool):
    """Load every key at its read pool into one FeatureSet."""
    from probe.features import load_features

    first = None
    for key in keys:
        part = load_features(cache, [key], pool=read_pool[key])
        if first is None:
            first = part
        else:
            first.features.update(part.features)
    return first


def run_knn(*, dataset, cache_dir, config_name, backbone_id, train_split, test_split, results_path, ram_cap_gb,
            blocks, timesteps, pool, k, temperature, batch_size, device) -> list[dict]:
    """kNN of the test split against the train split (streamed); one results row per k."""
    import torch

    from extract.precision import resolve_device
    from probe.knn import knn_classify

    from .results import append_results

    backbone_id, train_cache, test_cache = _open_pair(cache_dir, dataset, config_name, backbone_id,
                                                      train_split, test_split, ram_cap_gb)
    keys = _keys(blocks, timesteps)
    read_pool = {key: _read_pool(train_cache, key, pool) for key in keys}
    test = _load(test_cache, keys, read_pool)
    test_x = torch.cat([test.features[key].flatten(1) for key in keys], dim=1)
    num_classes = len(test.class_names) or int(test.labels.max()) + 1
    began = time.perf_counter()
    train_size = int(train_cache.valid.sum())
    scores = knn_classify(_iter_multi(train_cache, keys, read_pool, batch_size), None, test_x, test.labels,
                          num_classes, ks=k, temperature=temperature, device=resolve_device(device))
    seconds = time.perf_counter() - began
    rows = [dict(dataset=dataset, train_size=train_size, test_size=test.num_images, backbone_id=backbone_id,
                 head="knn", blocks=list(blocks), timesteps=list(timesteps), pool=int(pool or 0), k=kk, parameters=0,
                 epochs=0, seed=0, top1=s["top1"], top5=s["top5"], train_seconds=seconds)
            for kk, s in scores.items()]
    append_results(rows, results_path)
    return rows


def _iter_multi(cache, keys, read_pool, batch_size):
    """Stream ((n, sum of flattened widths), (n,) labels) batches of several keys, each read at its own pool."""
    import torch

    from probe.features import iter_feature_batches

    streams = [iter_feature_batches(cache, [key], batch_size, pool=read_pool[key]) for key in keys]
    for parts in zip(*streams):
        yield torch.cat([features[key].flatten(1) for (features, _), key in zip(parts, keys)], dim=1), parts[0][1]


def run_cka(*, dataset, cache_dir, config_name, backbone_id, split, blocks, timesteps, at_t, at_b, pool, estimator,
            batch_size, limit, out_dir, ram_cap_gb) -> list[Path]:
    """Block x block CKA at t=at_t and timestep x timestep CKA at b=at_b; Parquet and PNG under out_dir."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from extract.errors import ProbeError
    from probe.cka import cka_matrix
    from probe.features import iter_feature_batches, open_split, resolve_backbone_id

    from .report import plot_cka_heatmap

    backbone_id = resolve_backbone_id(cache_dir, dataset, split, config_name, backbone_id)
    cache = open_split(cache_dir, dataset, split, backbone_id, int(ram_cap_gb * 2**30) if ram_cap_gb else None)
    at_t = at_t if at_t is not None else timesteps[0]
    at_b = at_b if at_b is not None else blocks[0]
    panels = []
    if len(blocks) > 1:
        panels.append(("blocks", f"t{at_t}", [(b, at_t) for b in blocks], [f"b{b}" for b in blocks]))
    if len(timesteps) > 1:
        panels.append(("timesteps", f"b{at_b}", [(at_b, t) for t in timesteps], [f"t{t}" for t in timesteps]))
    if not panels:
        raise ProbeError("CKA needs at least two blocks or two timesteps: pass e.g. --blocks 19,24,30 --timesteps 150")
    keys = sorted({key for _, _, ks, _ in panels for key in ks})
    read_pool = {key: _read_pool(cache, key, pool) for key in keys}
    if estimator == "linear" or len(set(read_pool.values())) > 1:
        loaded = _load(cache, keys, read_pool)
        arrays = [loaded.features[key][:limit] if limit else loaded.features[key] for key in keys]
        matrix = cka_matrix(arrays, estimator=estimator, batch_size=batch_size)
    else:
        stream = iter_feature_batches(cache, keys, batch_size, pool=next(iter(read_pool.values())))
        taken = 0

        def batches():
            nonlocal taken
            for features, labels in stream:
                if limit and taken >= limit:
                    return
                rows = min(len(labels), limit - taken) if limit else len(labels)
                taken += rows
                yield [features[key][:rows] for key in keys]

        matrix = cka_matrix(batches=batches(), estimator="minibatch")
    out_dir = Path(out_dir)
    written = []
    records = []
    for kind, fixed, panel_keys, labels in panels:
        index = [keys.index(key) for key in panel_keys]
        sub = matrix[np.ix_(index, index)]
        for i, (bi, ti) in enumerate(panel_keys):
            for j, (bj, tj) in enumerate(panel_keys):
                records.append(dict(dataset=dataset, split=split, backbone_id=backbone_id, kind=kind, fixed=fixed,
                                    b_row=bi, t_row=ti, b_col=bj, t_col=tj, pool=int(pool or 0),
                                    estimator=estimator, cka=float(sub[i, j])))
        stem = f"cka_{dataset}_{split}_{backbone_id}_{kind}_{fixed}"
        written.append(plot_cka_heatmap(sub, labels, out_dir / f"{stem}.png",
                                        title=f"CKA over {kind} at {fixed} ({dataset} {split})"))
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path = out_dir / f"cka_{dataset}_{split}_{backbone_id}.parquet"
    pq.write_table(pa.Table.from_pylist(records), table_path)
    return [table_path, *written]


def run_sweep(*, dataset, cache_dir, config_name, backbone_id, train_split, test_split, results_path, ram_cap_gb,
              blocks, timesteps, pools, head, epochs, lr, optimizer, batch_size, seed, device, out_dir,
              progress) -> tuple[object, list[Path]]:
    """Linear probes (or kNN) over every (b, t, pool); results rows, sweep table, heatmaps."""
    import pyarrow.parquet as pq
    import torch

    from extract.errors import ProbeError
    from extract.precision import resolve_device
    from probe.heads import count_parameters, create_head, default_lr
    from probe.knn import knn_classify
    from probe.train import fit

    from .report import markdown_table, plot_sweep_heatmaps
    from .results import append_result, results_table

    backbone_id, train_cache, test_cache = _open_pair(cache_dir, dataset, config_name, backbone_id,
                                                      train_split, test_split, ram_cap_gb)
    in_test = set(test_cache.arrays())
    cached = [key for key in train_cache.arrays() if key in in_test]
    keys = [key for key in cached if (not blocks or key[0] in blocks) and (not timesteps or key[1] in timesteps)]
    incomplete = [key for key in keys if not (train_cache.is_complete(*key) and test_cache.is_complete(*key))]
    if incomplete:
        log.warning("sweep skips arrays still being extracted: %s (finish them with diffrep extract)",
                    ", ".join(f"b{b}/t{t}" for b, t in incomplete))
        keys = [key for key in keys if key not in incomplete]
    if not keys:
        raise ProbeError(f"no cached (b, t) arrays of {dataset} match the sweep: cached are "
                         f"{', '.join(f'b{b}/t{t}' for b, t in cached) or 'none'}; run diffrep extract first")
    lr = lr if lr is not None else default_lr("linear")
    rows = []
    for key in keys:
        for pool in pools:
            read_pool = {key: _read_pool(train_cache, key, pool)}
            train, test = _load(train_cache, [key], read_pool), _load(test_cache, [key], read_pool)
            num_classes = len(train.class_names) or int(train.labels.max()) + 1
            row = dict(dataset=dataset, train_size=train.num_images, test_size=test.num_images,
                       backbone_id=backbone_id, blocks=[key[0]], timesteps=[key[1]], pool=int(pool))
            if head == "knn":
                began = time.perf_counter()
                scores = knn_classify(train.features[key], train.labels, test.features[key], test.labels,
                                      num_classes, ks=(20,), device=resolve_device(device))[20]
                row.update(head="knn", k=20, parameters=0, epochs=0, top1=scores["top1"], top5=scores["top5"],
                           train_seconds=time.perf_counter() - began)
            else:
                torch.manual_seed(seed)
                shapes = {key: tuple(train.features[key].shape[1:])}
                module = create_head("linear", shapes, num_classes, pool=pool or None)
                result = fit(module, train.features, train.labels, test.features, test.labels, epochs=epochs, lr=lr,
                             optimizer=optimizer, batch_size=batch_size, seed=seed, device=resolve_device(device),
                             progress=progress)
                row.update(head="linear", parameters=count_parameters(module), epochs=epochs, lr=lr,
                           optimizer=optimizer, batch_size=batch_size, seed=seed, top1=result.top1, top5=result.top5,
                           train_seconds=result.train_seconds)
            log.info("sweep b=%d t=%d pool=%d: top-1 %.4f", key[0], key[1], pool, row["top1"])
            append_result(row, results_path)  # one row at a time: an interrupted sweep keeps what it measured
            rows.append(row)
    table = results_table(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sweep_{dataset}_{backbone_id}_{head}"
    pq.write_table(table, out_dir / f"{stem}.parquet")
    (out_dir / f"{stem}.md").write_text(f"# sweep {dataset} {backbone_id} {head}\n\n" + markdown_table(table) + "\n")
    written = [out_dir / f"{stem}.parquet", out_dir / f"{stem}.md"]
    for metric in ("top1", "top5"):
        written.append(plot_sweep_heatmaps(table, out_dir / f"{stem}_{metric}.png", metric=metric,
                                           title=f"{dataset} {backbone_id} {head} {metric}"))
    return table, written
