import os

import torch

# The Triton kernels run in the CPU interpreter when there is no GPU; the flag is read when a
# @triton.jit function is defined, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
