"""Run under ``torchrun --nproc_per_node N`` by tests/test_fsdp.py: sharded fine-tunes (FSDP2 over gloo).

argv: CONVERTED DATA OUT_ROOT PER_RANK_BATCH JOB...; a JOB is MODE (a whole run), MODE:interrupt:K (stopped by
a Ctrl-C at step K, after a checkpoint), MODE:resume, or ``gradients`` (one backward: sharded gradients
against the one-process gradients of the whole batch).  Rank 0 writes OUT_ROOT/results.json: {job: {...}}.
"""

import json
import sys
import time
from pathlib import Path

import torch.distributed as dist

from ibnorm.finetune import FinetuneOptions, finetune
from ibnorm.finetune.plan import world_size_here

STEPS = 4


def options(data: str, out: Path, mode: str, batch: int, **kw) -> FinetuneOptions:
    return FinetuneOptions(data=data, eval_data=data, steps=STEPS, seq_len=32, batch_size=batch,
                           eval_every=2, eval_blocks=4, lr=5e-3, warmup=2, train=mode, compare_source=False, out=str(out),
                           shard="fsdp", **kw)


def main() -> None:
    converted, data, root, batch, jobs = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
    results = {}
    for job in jobs:
        t0 = time.perf_counter()
        if job == "gradients":
            results[job] = gradients(converted)
            continue
        mode, _, action = job.partition(":")
        out = root / f"{mode}-{'resumed' if action else 'whole'}"
        if action.startswith("interrupt"):
            stop = int(action.split(":")[1])

            def interrupt(event, stop=stop):
                if event.get("event") == "step" and event["step"] == stop:
                    raise KeyboardInterrupt

            try:
                finetune(converted, options(data, out, mode, batch, save_every=2), interrupt)
            except KeyboardInterrupt:
                results[job] = {"interrupted": True}
            continue
        result = finetune(converted, options(data, out, mode, batch, resume=action == "resume"))
        results[job] = {"losses": result.losses, "evals": result.evals, "world": world_size_here(), "out": result.out,
                        "seconds": time.perf_counter() - t0}
    if not dist.is_initialized() or dist.get_rank() == 0:
        previous = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else {}
        (root / "results.json").write_text(json.dumps({**previous, **results}))


def gradients(converted: str) -> dict:
    """|sharded − reference| and Σsharded/Σreference of the gradients of one backward of the whole batch."""
    import torch

    import ibnorm
    from ibnorm.finetune import select_trainable
    from ibnorm.finetune.shard import FSDPEngine, full_value

    def model():
        m = ibnorm.load(converted)
        m.model.norm.set_lambda(0.1)  # a scalar λ: fully_shard refuses 0-dim parameters, so it stays replicated
        return select_trainable(m, "all", 8)

    x = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    reference = model()
    reference(input_ids=x, labels=x).loss.backward()
    engine = FSDPEngine()
    sharded = engine.prepare(model())
    assert engine.replicated and sharded.model.norm.lam.dim() == 0
    local = x[engine.process_index :: engine.num_processes]
    engine.backward(sharded(input_ids=local, labels=local).loss)
    ref = dict(reference.named_parameters())
    pairs = [(full_value(p.grad).clone(), ref[n].grad.clone()) for n, p in sharded.named_parameters()]  # before clipping
    grads = [p for p in sharded.parameters() if p.grad is not None]
    norm = engine.clip_grad_norm_(grads, 1e9)
    engine.clip_grad_norm_(grads, float(norm) / 2)
    clipped = engine.clip_grad_norm_(grads, 1e9)
    reference_norm = torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.grad is not None], 1e9)
    return {"max_abs_diff": max(float((a - b).abs().max()) for a, b in pairs), "norm": float(norm), "clipped": float(clipped),
            "reference_norm": float(reference_norm),
            "ratio": sum(float(a.abs().sum()) for a, _ in pairs) / sum(float(b.abs().sum()) for _, b in pairs)}


if __name__ == "__main__":
    main()
