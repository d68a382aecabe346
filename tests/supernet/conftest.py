import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # The supernet tests run tiny models: with other jobs on the 2 shared cores, torch's default 2 intra-op
    # threads spin against each other (measured: 71 s at load 5 vs 11 s with one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
