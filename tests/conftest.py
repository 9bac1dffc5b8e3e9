"""Test setup. Triton chooses compiled or interpreted kernels when they are decorated, so the
interpreter is switched on here, before anything imports acn_kernels, on machines without a GPU.

Randomness is fixed per test: torch's generator is seeded from the test's id (each test draws its
own fresh inputs, the same ones on every run), and hypothesis runs derandomized with the "ci"
profile's budget. `HYPOTHESIS_PROFILE=fuzz` (and ACN_KERNELS_FUZZ_EXAMPLES=N) runs the randomized
tests longer, with a random seed."""
import os
import zlib

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker a core: a thread each, and so the processes they start
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("fuzz", max_examples=int(os.environ.get("ACN_KERNELS_FUZZ_EXAMPLES", "1000")),
                          deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def fixed_seed(request):
    """Fresh inputs per test, the same on every run: the generator seeded from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def pytest_collection_modifyitems(config, items):
    # the slow tests first, so that the two workers end together: `paper --quick` alone takes about as
    # long as a worker's quarter of the rest, and started last it was the suite's tail
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
