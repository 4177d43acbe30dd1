"""Run under ``torchrun --nproc_per_node N`` by tests/test_fsdp.py: sharded fine-tunes (FSDP2 over gloo).

argv: CONVERTED OUT_ROOT PER_RANK_BATCH JOB...; a JOB is MODE (a whole run), MODE:interrupt:K (stopped by a
Ctrl-C at step K, after a checkpoint) or MODE:resume.  Rank 0 writes OUT_ROOT/results.json:
{job: {"losses", "evals", "world"}}.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from ibnorm.finetune import FinetuneOptions, finetune
from ibnorm.finetune.plan import world_size_here

STEPS = 6


def options(out: Path, mode: str, batch: int, **kw) -> FinetuneOptions:
    return FinetuneOptions(data="builtin:pydoc:train", eval_data="builtin:pydoc:eval", steps=STEPS, seq_len=32, batch_size=batch,
                           eval_every=3, eval_blocks=4, lr=5e-3, warmup=2, train=mode, compare_source=False, out=str(out),
                           shard="fsdp", **kw)


def main() -> None:
    converted, root, batch, jobs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    results = {}
    for job in jobs:
        mode, _, action = job.partition(":")
        out = root / f"{mode}-{'resumed' if action else 'whole'}"
        if action.startswith("interrupt"):
            stop = int(action.split(":")[1])

            def interrupt(event, stop=stop):
                if event.get("event") == "step" and event["step"] == stop:
                    raise KeyboardInterrupt

            try:
                finetune(converted, options(out, mode, batch, save_every=2), interrupt)
            except KeyboardInterrupt:
                results[job] = {"interrupted": True}
            continue
        result = finetune(converted, options(out, mode, batch, resume=action == "resume"))
        results[job] = {"losses": result.losses, "evals": result.evals, "world": world_size_here(), "out": result.out}
    if not dist.is_initialized() or dist.get_rank() == 0:
        previous = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else {}
        (root / "results.json").write_text(json.dumps({**previous, **results}))


if __name__ == "__main__":
    main()
