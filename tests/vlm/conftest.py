"""Every VLM test module runs on a fixed number of torch threads: ``TORCH_THREADS`` in the module (default 1).

Tiny models run as fast on one thread, and a shared machine's other jobs do not stall OpenMP's spin-waits; the
modules that run the shipped speech-world models set 2. Module-scoped, so module-scoped fixtures (a model trained
once per module) run under the same setting as the tests.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _torch_threads(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, int(getattr(request.module, "TORCH_THREADS", 1))))
    yield
    torch.set_num_threads(threads)
