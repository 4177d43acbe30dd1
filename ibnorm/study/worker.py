"""Entry point of one launched run: ``torchrun … -m ibnorm.study.worker CONFIG.json OUT [DEADLINE]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import torch

    from .runner import run_config, write_run
    from .train import init_distributed

    cfg = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(cfg["threads"])
    init_distributed()
    out = Path(argv[1])
    rec = run_config(cfg, out, float(argv[2]) if len(argv) > 2 else None)
    if rec is not None and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        write_run(out, rec)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
