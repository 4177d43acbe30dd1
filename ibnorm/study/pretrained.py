"""``ibnorm study --from SOURCE``: is IBNorm worth it for this model?  A controlled fine-tune comparison.

Every arm starts from the same checkpoint: ``source`` (its original norms) and one or more conversions of
it (each converted once, cached under ``OUT/arms``).  Every arm is then fine-tuned by ``ibnorm.finetune``
under one protocol: the same trainable-parameter policy, tokens, steps, data order per seed, recipe and
learning-rate grid.  The learning rate is chosen per arm on seed 0 by the validation loss (a split of the
training documents, never the test text); the other seeds run at the chosen rate.  Before any fine-tuning
each arm is evaluated once (the ``step 0`` row: what the conversion itself costs).

The runs use the study runner (one JSON record per run under ``OUT/runs``, finished runs skipped,
``--shard``, torchrun launch); a run checkpoints through ``ibnorm.finetune`` and resumes mid-run.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..io.atomic import atomic_directory
from ..io.checkpoint import write_json_atomic
from .runner import StudyError, load_run

SOURCE_ARM = "source"
DEFAULT_OP = "tanh"
STUDY_FILE = "study.json"
ENTRY = "ibnorm.study.pretrained:run_one"
ARM_GRAMMAR = ("source, OP, OP@LAMBDA, OP/GROUPING or OP@LAMBDA/GROUPING (OP: tanh, log, power; LAMBDA ≥ 0: a fixed λ "
               "instead of calibrated; GROUPING: rms, layer)")
_ARM = re.compile(r"^(?P<op>[a-z]+)(?:@(?P<lam>[^/]+))?(?:/(?P<grouping>[a-z]+))?$")


@dataclass(frozen=True)
class Arm:
    """One way of starting the fine-tune: the source's own norms, or a conversion of them."""

    name: str
    op: str | None = None  # None: the source arm
    lam: float | None = None  # a fixed λ for every channel; None = calibrated
    grouping: str = "auto"

    @property
    def directory(self) -> str:
        return self.name.replace("@", "-lam").replace("/", "-")


def parse_arm(text: str) -> Arm:
    """``source`` or ``OP[@LAMBDA][/GROUPING]``; one ``error:`` line for anything else."""
    from ..compression import COMPRESSION_OPS
    from ..validate import check_lam

    text = text.strip()
    if text == SOURCE_ARM:
        return Arm(SOURCE_ARM)
    m = _ARM.match(text)
    if not m or m["op"] not in COMPRESSION_OPS:
        raise StudyError(f"unknown arm {text!r}; an arm is {ARM_GRAMMAR}")
    lam = None
    if m["lam"] is not None:
        try:
            lam = float(m["lam"])
        except ValueError:
            raise StudyError(f"arm {text!r}: λ {m['lam']!r} is not a number") from None
        check_lam(lam)
    grouping = m["grouping"] or "auto"
    if grouping not in ("auto", "rms", "layer"):
        raise StudyError(f"arm {text!r}: grouping {grouping!r} is not rms or layer")
    return Arm(text, m["op"], lam, grouping)


def parse_arms(texts: list[str] | tuple[str, ...]) -> tuple[Arm, ...]:
    """``source`` and the default conversion always; then the arms asked for, each once."""
    arms = [Arm(SOURCE_ARM), Arm(DEFAULT_OP, DEFAULT_OP)]
    for arm in (parse_arm(t) for t in texts):
        if arm.directory not in {a.directory for a in arms}:
            arms.append(arm)
    return tuple(arms)


@dataclass
class PretrainedStudy:
    """What a pretrained comparison is asked to do.  ``protocol()`` is what an existing OUT must match."""

    source: str
    data: str
    out: Path
    eval_data: str | None = None
    arms: tuple[Arm, ...] = field(default_factory=lambda: parse_arms(()))
    train: str = "norms"
    steps: int = 100
    seeds: int = 5
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    seq_len: int = 128
    batch_size: int = 4
    warmup: int = 10
    lora_rank: int = 8
    val_blocks: int = 16  # validation examples of seq_len tokens
    test_docs: int = 64  # test documents (each scored on its first seq_len tokens)
    calib: str = "builtin:pydoc:train"
    calib_samples: int = 32
    save_every: int = 0  # checkpoint every N steps (0: only when interrupted)
    alpha: float = 0.05
    threads: int = 1
    device: str = "cpu"
    jobs: int = 1
    launcher: str | None = None  # None (in this process) | torchrun | accelerate
    nproc: int | None = None

    def protocol(self) -> dict:
        """The options every run of OUT shares (arms, seeds and --train may grow a study; these may not)."""
        keys = ("source", "data", "eval_data", "steps", "lrs", "seq_len", "batch_size", "warmup", "lora_rank",
                "val_blocks", "test_docs", "calib", "calib_samples")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k in keys}


def check_out(study: PretrainedStudy) -> None:
    """An existing OUT must hold a study of the same protocol (refused before any work)."""
    path = study.out / STUDY_FILE
    if study.out.exists() and not study.out.is_dir():
        raise StudyError(f"--out {study.out} exists and is not a directory")
    if path.exists():
        stored = json.loads(path.read_text())
        if stored != study.protocol():
            diff = sorted(k for k in set(stored) | set(study.protocol()) if stored.get(k) != study.protocol().get(k))
            raise StudyError(f"{study.out} holds a study with different options ({', '.join(diff)}); use another --out")
    elif study.out.exists() and any(not p.name.startswith(".") for p in study.out.iterdir()):  # .gitignore may be there
        raise StudyError(f"--out {study.out} exists and is not a study directory")


# --- preparation: data splits and cached arms ------------------------------------------------------------

def prepare(study: PretrainedStudy, progress=None) -> None:
    """Write the protocol, the data splits and every arm's model into OUT (each once, atomically)."""
    from ..data import read_texts

    notify = progress or (lambda e: None)
    data_dir = study.out / "data"
    if not (data_dir / "test.jsonl").exists():  # the data is read (and so checked) before OUT is written
        docs = read_texts(study.data)
        held = read_texts(study.eval_data) if study.eval_data else None
        splits = split_documents(docs, held)
        study.out.mkdir(parents=True, exist_ok=True)
        with atomic_directory(data_dir, force=True) as tmp:
            for name, texts in splits.items():
                (tmp / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    write_json_atomic(study.out / STUDY_FILE, study.protocol())
    for arm in study.arms:
        notify({"event": "arm", "arm": arm.name})
        prepare_arm(study, arm)


def split_documents(docs: list[str], held: list[str] | None) -> dict[str, list[str]]:
    """Validation: the last tenth of the training documents; test: the held-out text, else the tenth before."""
    n = max(1, len(docs) // 10)
    if len(docs) < (2 if held is not None else 3) or len(docs) - (1 if held is not None else 2) * n < 1:
        raise StudyError(f"--data has {len(docs)} documents: too few to split off validation"
                         + ("" if held is not None else " and test") + " documents")
    if held is not None:
        return {"train": docs[:-n], "val": docs[-n:], "test": held}
    return {"train": docs[: -2 * n], "val": docs[-n:], "test": docs[-2 * n : -n]}


def arm_options(study: PretrainedStudy, arm: Arm) -> dict:
    """What the cached model of an arm was built from (a cache of other options is refused)."""
    from ..io.sources import resolve_short_name

    if arm.op is None:
        return {"source": resolve_short_name(study.source)}
    return {"source": resolve_short_name(study.source), "op": arm.op, "lam": arm.lam, "grouping": arm.grouping,
            "calib": study.calib, "calib_samples": study.calib_samples, "seq_len": study.seq_len}


def prepare_arm(study: PretrainedStudy, arm: Arm) -> Path:
    target = study.out / "arms" / arm.directory
    record = target / "ibnorm_study_arm.json"
    if target.exists():
        stored = json.loads(record.read_text()) if record.exists() else None
        if stored != arm_options(study, arm):
            raise StudyError(f"{target} was built from other options (delete it to rebuild)")
        return target
    if arm.op is None:
        from ..io.sources import load_source
        from ..pipeline.families import family_of

        loaded = load_source(study.source)
        with atomic_directory(target, force=False) as tmp:
            family_of(loaded.library, loaded.task).save_weights(loaded.model, tmp, "5GB")
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / record.name, arm_options(study, arm))
        return target
    from ..pipeline.convert import convert_checkpoint
    from ..pipeline.options import ConvertOptions

    opts = ConvertOptions(op=arm.op, lam=arm.lam, grouping=arm.grouping, calib=study.calib,
                          calib_samples=study.calib_samples, seq_len=study.seq_len)
    staging = target.with_name(f".{target.name}.converting")
    convert_checkpoint(study.source, staging, opts, force=True)
    write_json_atomic(staging / record.name, arm_options(study, arm))
    staging.rename(target)  # the cache appears complete or not at all
    return target


# --- the runs -------------------------------------------------------------------------------------------

def _base(study: PretrainedStudy, arm: Arm) -> dict:
    return {"entry": ENTRY, "arm": arm.name, "model": f"arms/{arm.directory}", "seq_len": study.seq_len,
            "val_blocks": study.val_blocks, "test_docs": study.test_docs, "batch_size": study.batch_size,
            "threads": study.threads, "device": study.device}


def step0_config(study: PretrainedStudy, arm: Arm) -> dict:
    return {**_base(study, arm), "run": f"step0/{arm.directory}", "step": 0}


def run_configs(study: PretrainedStudy, arm: Arm, lr: float, seeds: range) -> list[dict]:
    return [{**_base(study, arm), "run": f"{study.train}/{arm.directory}/lr{lr:g}_s{s}", "step": study.steps,
             "train": study.train, "lr": lr, "seed": s, "steps": study.steps, "warmup": study.warmup,
             "lora_rank": study.lora_rank, "save_every": study.save_every} for s in seeds]


def select_lr(records: list[dict]) -> tuple[float, bool]:
    """The learning rate of the lowest validation loss; an exact tie goes to the smaller rate (and is recorded)."""
    def key(r: dict) -> float:
        return r["val"] if r["val"] is not None and math.isfinite(r["val"]) else math.inf

    best = min(records, key=lambda r: (key(r), r["lr"]))
    tie = sum(key(r) == key(best) for r in records) > 1
    return best["lr"], tie


def plan(study: PretrainedStudy) -> tuple[list[dict], int]:
    """Runs that can start now and how many are finished: step 0, the LR grid on seed 0, then the seeds."""
    todo, done = [], 0

    def need(cfgs: list[dict]) -> list[dict | None]:
        nonlocal done
        recs = [load_run(study.out, c) for c in cfgs]
        done += sum(r is not None for r in recs)
        todo.extend(c for c, r in zip(cfgs, recs) if r is None)
        return recs

    for arm in study.arms:
        need([step0_config(study, arm)])
        grid = need([c for lr in study.lrs for c in run_configs(study, arm, lr, range(1))])
        if all(r is not None for r in grid):
            need(run_configs(study, arm, select_lr(grid)[0], range(1, study.seeds)))
    return todo, done


def run_study(study: PretrainedStudy, progress=None, shard: tuple[int, int] = (0, 1)) -> None:
    from . import runner

    runner.run_study(study, study.out, progress, study.jobs, shard, planner=lambda out: plan(study))


def run_one(cfg: dict, out: Path) -> dict:
    """One run's record: step 0 (the arm as converted), or a fine-tune through ``ibnorm.finetune``."""
    from ..loading import open_model

    model_dir = out / cfg["model"]
    if cfg["step"] == 0:
        loaded = open_model(str(model_dir))
        val = validation_loss(loaded, out, cfg)
        return {"config": cfg, **_common(cfg), "val": val, "evals": [{"step": 0, "loss": val}],
                **test_losses(loaded, out, cfg), "seconds": 0.0}
    from ..finetune import FinetuneOptions, finetune, latest_checkpoint
    from ..finetune.options import CHECKPOINT_DIR_SUFFIX

    work = out / "work" / cfg["run"]
    ckpt = Path(f"{work}{CHECKPOINT_DIR_SUFFIX}")
    opts = FinetuneOptions(data=str(out / "data" / "train.jsonl"), eval_data=str(out / "data" / "val.jsonl"),
                           steps=cfg["steps"], out=str(work), eval_every=0, eval_blocks=cfg["val_blocks"], train=cfg["train"],
                           lr=cfg["lr"], warmup=cfg["warmup"], batch_size=cfg["batch_size"], seq_len=cfg["seq_len"],
                           seed=cfg["seed"], save_every=cfg["save_every"], resume=latest_checkpoint(ckpt) is not None,
                           force=True, lora_rank=cfg["lora_rank"], compare_source=False)
    result = finetune(str(model_dir), opts)
    tested = test_losses(open_model(str(work)), out, cfg)
    rec = {"config": cfg, **_common(cfg), "val": result.evals[-1]["loss"], "evals": result.evals, "losses": result.losses,
           **tested, "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
           "diverged": not math.isfinite(result.losses[-1])}
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.barrier()  # every process has read the output before it goes
    if not distributed or torch.distributed.get_rank() == 0:
        shutil.rmtree(work, ignore_errors=True)  # the fine-tuned model and its checkpoints are not kept
        shutil.rmtree(ckpt, ignore_errors=True)
    return rec


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _common(cfg: dict) -> dict:
    return {k: cfg.get(k) for k in ("arm", "step", "train", "lr", "seed")}


def validation_loss(loaded, out: Path, cfg: dict) -> float:
    """The loss the fine-tune reports on its held-out examples (the same examples, the same function)."""
    from ..data import read_texts, token_examples
    from ..finetune.data import Examples, evaluate_loss

    texts = read_texts(str(out / "data" / "val.jsonl"))
    ex = Examples(token_examples(loaded.tokenizer, texts, cfg["seq_len"], cfg["val_blocks"]))
    return evaluate_loss(loaded.model.to(_device()), ex, cfg["batch_size"], _device())["loss"]


@torch.no_grad()
def test_losses(loaded, out: Path, cfg: dict) -> dict:
    """Mean next-token loss of each test document (its first seq_len tokens); ``test`` is their mean."""
    from ..data import read_texts

    model, tok = loaded.model.to(_device()).eval(), loaded.tokenizer
    ids = [tok(t, add_special_tokens=False)["input_ids"][: cfg["seq_len"]] for t in read_texts(str(out / "data" / "test.jsonl"))]
    ids = [d for d in ids if len(d) >= 2][: cfg["test_docs"]]
    if not ids:
        raise StudyError("no test document has 2 tokens or more")
    docs = []
    for i in range(0, len(ids), cfg["batch_size"]):
        docs += _batch_losses(model, ids[i : i + cfg["batch_size"]])
    return {"test": float(sum(docs) / len(docs)), "test_docs": docs}


def _batch_losses(model, batch: list[list[int]]) -> list[float]:
    width = max(len(d) for d in batch)
    device = next(model.parameters()).device
    x = torch.zeros(len(batch), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(batch), width, dtype=torch.long, device=device)
    for j, d in enumerate(batch):
        x[j, : len(d)] = torch.tensor(d, device=device)
        mask[j, : len(d)] = 1
    logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    keep = mask[:, 1:].float()
    return ((nll * keep).sum(1) / keep.sum(1)).tolist()


def records(study: PretrainedStudy) -> list[dict]:
    """Every finished run of this study's arms and --train (step 0 included), in plan order."""
    out = []
    for arm in study.arms:
        cfgs = [step0_config(study, arm)] + [c for lr in study.lrs for c in run_configs(study, arm, lr, range(study.seeds))]
        out += [r for r in (load_run(study.out, c) for c in cfgs) if r is not None]
    return out


__all__ = ["Arm", "PretrainedStudy", "parse_arm", "parse_arms", "check_out", "prepare", "plan", "run_study", "run_one",
           "records", "select_lr", "split_documents"]
