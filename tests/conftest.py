import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _close_distributed_pools():
    yield
    from megatron_opd.testing.multiprocess import close_all_pools

    close_all_pools()
