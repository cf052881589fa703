"""``torchrun -m tests.probe.dist_entry <diffrep command>``: the CLI, with one rank killed mid-epoch on request.

``DIFFREP_TEST_DIE=RANK:EPOCH:BATCH`` makes that rank exit at once (``os._exit``, as a killed process: no
cleanup, no message) when it reaches that batch (1-based) of that epoch (1-based). Test code only.
"""

import os

from probe import train as train_module


def _dying(real, rank: int, epoch: int, batch: int):
    calls = {"epoch": 0}

    def train_one_epoch(head, optimizer, batches, *args, **kwargs):
        calls["epoch"] += 1
        if calls["epoch"] != epoch or int(os.environ.get("RANK", "0")) != rank:
            return real(head, optimizer, batches, *args, **kwargs)

        def counted():
            for number, item in enumerate(batches, start=1):
                if number == batch:
                    os._exit(9)
                yield item
        return real(head, optimizer, counted(), *args, **kwargs)
    return train_one_epoch


if __name__ == "__main__":
    if os.environ.get("DIFFREP_TEST_DIE"):
        rank, epoch, batch = (int(v) for v in os.environ["DIFFREP_TEST_DIE"].split(":"))
        train_module.train_one_epoch = _dying(train_module.train_one_epoch, rank, epoch, batch)
    from pipeline.cli.main import main

    main()
