"""The feature cache: a Zarr v3 group per (dataset, split, backbone), one float16 array per (b, t), written shard by shard.

Write: ``create_cache`` (metadata, index and labels first), then workers ``write_shard_data`` whole
shards and the one orchestrating process marks them (``MarkWriter``) and records the run
(``record_run``). Read: ``open_cache`` returns a ``FeatureCache``, which reads an array two ways:

* ``load(b, t, pool=None)`` is eager: the whole (N, C, h, w) array in RAM, read a few shards at a
  time, refused past ``ram_cap_bytes`` (default ``DEFAULT_RAM_CAP_BYTES``). Use it when the array
  fits, e.g. to train many heads on the same features.
* ``iter_shards(b, t, pool=None)`` streams ``(start, stop, rows)`` shard by shard: memory stays at
  one shard whatever N is. Use it for arrays over the cap (ImageNet) or a single pass.

Both refuse an array with unwritten or damaged shards by name (``allow_incomplete=True`` reads them
as zeros) and derive a coarser ``pool`` exactly from the stored one. The layout is in
``extract.cache.spec``; integrity checks in ``extract.cache.integrity``.
"""

from extract.cache.reader import DEFAULT_RAM_CAP_BYTES, FeatureCache, open_cache
from extract.cache.spec import (
    FORMAT_VERSION, CacheSpec, cache_path, count_objects, inner_chunk_rows, view_suffix,
)
from extract.cache.writer import (
    MarkWriter, ShardMarks, create_cache, record_missing_checksums, record_run, reset_shards, write_shard_data,
)

__all__ = [
    "FORMAT_VERSION",
    "DEFAULT_RAM_CAP_BYTES",
    "CacheSpec",
    "FeatureCache",
    "cache_path",
    "create_cache",
    "write_shard_data",
    "ShardMarks",
    "MarkWriter",
    "count_objects",
    "record_run",
    "record_missing_checksums",
    "reset_shards",
    "open_cache",
    "inner_chunk_rows",
    "view_suffix",
]
