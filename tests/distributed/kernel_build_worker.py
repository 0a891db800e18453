"""One rank of tests/distributed/test_kernel_build.py, started by ``torch.distributed.run`` (2 gloo ranks).

Usage: ``kernel_build_worker.py MODE OUT_DIR [FAILING_CXX]``; writes ``OUT_DIR/rank<r>.json``. Modes:
``build`` (both ranks ask for the kernels), ``fail_one`` (rank 1's compiler fails), ``late`` (rank 1 asks only
after rank 0 has returned: rank 0 must not wait for it beyond the timeout).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_tiger.optim import Tiger, _fused

mode, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
if mode == "fail_one" and rank == 1:
    os.environ["CXX"] = sys.argv[3]
if mode == "late" and rank == 1:
    dist.barrier()  # released once rank 0 has its answer
available = _fused.fused_available()
if mode == "late" and rank == 0:
    dist.barrier()
try:  # the optimizer honours the common answer
    Tiger(torch.nn.Linear(2, 2).parameters(), lr=1e-3, fused=True)
    refused = False
except RuntimeError:
    refused = True
result = {"rank": rank, "available": available, "refused": refused}
try:
    from lightning_tiger.optim import build
except ImportError:  # the code before the build module: the test still reads the log lines
    pass
else:
    status = build.kernel_status()
    result.update(built=status.built, local_ok=status.ok)
(out / f"rank{rank}.json").write_text(json.dumps(result))
dist.destroy_process_group()
