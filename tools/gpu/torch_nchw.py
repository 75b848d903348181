"""torch_ref.py, with NCHW (contiguous) tensors and weights where it asks for channels-last.

kd's tensors are NCHW; PyTorch's reference runs channels-last, the layout cuDNN's tensor-core
kernels read natively. Run beside torch_ref.py on the same card, this measures what the memory
format alone is worth to PyTorch on this network, before kd builds channels-last tensors:
    python3 .gpu/torch_nchw.py throughput --no-maxpool --batch 256 --warmup 10 --steps 30
Its headers still say "channels_last": the name is torch_ref.py's, the layout is NCHW.
"""
import os
import runpy
import sys

import torch

torch.channels_last = torch.contiguous_format
print("torch_nchw: torch_ref.py with memory_format=torch.contiguous_format (NCHW)", flush=True)
sys.argv[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_ref.py")
runpy.run_path(sys.argv[0], run_name="__main__")
