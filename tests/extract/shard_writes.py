"""A shard written in a test the way an extraction writes it: the job's ``write_shard_data``, then the orchestrator's ``MarkWriter``."""

from extract.cache import MarkWriter, ShardMarks, write_shard_data


def write_and_mark(path, shard, features, view=0, invalid=None, compute=None):
    """Write whole shard ``shard`` of the (b, t) arrays in ``features``, then mark it with its rows ``invalid`` ({row: reason})."""
    markers = write_shard_data(path, shard, features, view=view)
    MarkWriter(path).mark([ShardMarks(shard, {(b, t, view): value for (b, t), value in markers.items()},
                                      dict(invalid or {}), compute)])
