"""Host copies run on a stream of their own: they see all the work queued before them, and work
queued after `readbacks_done` does not overwrite what they read."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from tuili.engine.transfer import HostCopy, readbacks_done  # noqa: E402


def test_host_copy_sees_earlier_work_and_precedes_later_writes():
    x = torch.zeros(1 << 22, device="cuda")
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):  # keep the stream busy, so the copy is queued well before it can run
        big = big @ big.T / 4096
    x += 1
    copies = [HostCopy(x[:8])]
    readbacks_done(x.device)
    x += 1  # queued after the first copy is done
    copies.append(HostCopy(x[:8]))
    readbacks_done(x.device)
    x.fill_(-1.0)  # and after the second
    assert copies[0].get().tolist() == [1.0] * 8
    assert copies[1].get().tolist() == [2.0] * 8
    torch.cuda.synchronize()
    assert x[0].item() == -1.0
