"""``ibnorm finetune``: parse options, run ibnorm.finetune, render progress and results."""

from __future__ import annotations

from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .render import console, err_console, num, print_json, quiet_libraries, short_names, table, user_errors


def finetune(
    converted: str = typer.Argument(..., help="A directory written by `ibnorm convert`."),
    data: Optional[str] = typer.Option(None, "--data", help="Training text: file, directory, .jsonl, .parquet, a saved `datasets` dataset, or builtin:pydoc:train (default: the calibration data the manifest records, else builtin:pydoc:train)."),
    steps: int = typer.Option(1000, help="Optimizer steps."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output directory (default: CONVERTED-ft)."),
    eval_data: Optional[str] = typer.Option(None, "--eval", help="Held-out text (default: the last 10% of --data)."),
    eval_data_old: Optional[str] = typer.Option(None, "--eval-data", hidden=True),  # the old name of --eval
    eval_every: int = typer.Option(100, help="Evaluate every N steps."),
    train: str = typer.Option("norms", help="norms (IBNorm γ, β, λ) | all | lora (through peft)."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW, linear warmup, cosine decay to 10%)."),
    warmup: int = typer.Option(20, help="Warmup steps."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    batch_size: int = typer.Option(4, help="Sequences per process and micro-step."),
    grad_accum: int = typer.Option(1, help="Gradient accumulation micro-steps."),
    clip: float = typer.Option(1.0, help="Gradient-norm clipping (0: off)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per packed block (default: 256, or the model's positions if fewer)."),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl/.parquet/datasets."),
    seed: int = typer.Option(0, help="Seed (data order and initialisation)."),
    save_every: int = typer.Option(0, help="Checkpoint every N steps into OUT-checkpoints/ (0: only on Ctrl-C)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in OUT-checkpoints/."),
    lora_rank: int = typer.Option(8, help="LoRA rank for --train lora."),
    no_source: bool = typer.Option(False, "--no-source", help="Do not evaluate the source model for comparison."),
    mi_every: int = typer.Option(0, "--mi-every", help="Record I(X;T) and I(T;Y) of every norm every N steps into metrics.jsonl (plot: ibnorm mi --trajectory)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    shard: str = typer.Option("auto", "--shard", help="none | ddp | fsdp (FSDP2 under torchrun) | auto (FSDP when the model would not fit each rank)."),
    plan: bool = typer.Option(False, "--plan", help="Print the memory per rank (parameters, gradients, optimizer, activations) and whether it fits; train nothing."),
    world_size: Optional[int] = typer.Option(None, "--world-size", help="Ranks to plan for (default: this launch's)."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory per rank for the plan, e.g. 80GB (default: the devices present)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary at the end."),
) -> None:
    """Short adaptation fine-tune of a converted model (λ learnable, kept ≥ 0)."""
    with user_errors():
        quiet_libraries()
        import ibnorm.finetune as ft
        from ibnorm.validate import parse_size

        eval_data = eval_data if eval_data_old is None else eval_data_old

        memory = parse_size(gpu_memory) if gpu_memory is not None else None
        if plan:
            opts = ft.FinetuneOptions(data=data or "", train=train, batch_size=batch_size, seq_len=seq_len, lora_rank=lora_rank,
                                      shard=shard, gpu_memory=memory)
            _show_plan(ft.plan_for(converted, opts, world_size), json_out)
            return
        if data is None:
            data, why = ft.default_data(converted)
            if not json_out:
                err_console.print(f"--data not given: training on {data} ({why})")
        opts = ft.FinetuneOptions(data=data, steps=steps, out=out, eval_data=eval_data, eval_every=eval_every, train=train,
                                  lr=lr, warmup=warmup, weight_decay=weight_decay, batch_size=batch_size, grad_accum=grad_accum,
                                  clip=clip, seq_len=seq_len, text_field=text_field, seed=seed, save_every=save_every,
                                  resume=resume, force=force, lora_rank=lora_rank, compare_source=not no_source,
                                  mi_every=mi_every, shard=shard, gpu_memory=memory)
        show = not json_out and err_console.is_terminal
        bar = Progress(TextColumn("fine-tune"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, disable=not show)
        with bar:
            task = bar.add_task("steps", total=steps, info="")

            def progress(event: dict) -> None:
                if event["event"] == "start" and not json_out:
                    err_console.print(f"IBNorm path on this device: {event['kernel']}; {event['processes']} process(es); starting at step {event['step']}")
                    bar.update(task, completed=event["step"])
                elif event["event"] == "step":
                    info = f"loss {event['loss']:.4f}  lr {event['lr']:.2e}  {event['tokens_per_s']:.0f} tok/s"
                    if "eval" in event:
                        e = event["eval"]
                        info += f"  eval ppl {e['perplexity']:.3f}" if "perplexity" in e else f"  eval acc {e['accuracy']:.3f}"
                    bar.update(task, completed=event["step"], info=info)
                elif event["event"] == "interrupted":
                    err_console.print(f"interrupted: checkpoint saved to {event['checkpoint']} (continue with --resume)")

            try:
                result = ft.finetune(converted, opts, progress)
            except ft.PlanDoesNotFit as e:
                _show_plan(e.plan, False, console=err_console)
                raise
    if not result.is_main_process:
        return
    if json_out:
        print_json(result.summary())
        return
    metric = "perplexity" if "perplexity" in result.evals[-1] else "accuracy"
    rows = []
    if result.source_eval:
        rows.append(("source model (original norms)", f"{result.source_eval[metric]:.4g}", f"{result.source_eval['loss']:.4f}"))
    for e in result.evals:
        rows.append((f"step {e['step']}", f"{e[metric]:.4g}", f"{e['loss']:.4f}"))
    console.print(table("held-out evaluation", ("model", metric, "loss"), rows, numeric=(1, 2)))
    short = short_names(list(result.lambda_trajectory))
    lam_rows = [(short[name], num(traj[0]), num(traj[-1])) for name, traj in result.lambda_trajectory.items()]
    console.print(table("λ per layer (mean over channels)", ("layer", "start", "end"), lam_rows, numeric=(1, 2)))
    console.print(f"{result.steps} steps in {result.seconds:.1f} s ({result.tokens_per_second:.0f} tokens/s); written {result.out}")


def _show_plan(plan, json_out: bool, console=console) -> None:
    if json_out:
        print_json(plan.to_json())
        return
    from ibnorm.finetune.plan import plan_rows

    console.print(f"memory plan: --train {plan.train}, {plan.shard}, {plan.world_size} rank(s)")
    console.print(table("", ("", "per rank"), plan_rows(plan)))
    console.print(f"{plan.trainable:,} of {plan.total_parameters:,} parameters train; "
                  + ("fits" if plan.fits else "does NOT fit") + f" ({plan.device})")
