"""ibnorm finetune --shard fsdp (FSDP2 over gloo, 2 ranks under torchrun) against one process, and the memory plan.

One torchrun launch runs every sharded job (tests/fsdp_worker.py); the references run in this process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ibnorm
from ibnorm.errors import IBNormError
from ibnorm.finetune import FinetuneOptions, finetune, memory_plan
from models import tiny_lm_with_tokenizer

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
MODES = ("norms", "all", "lora")
TOL = 2e-5  # float32: the sharded reduction sums in another order


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    src = tiny_lm_with_tokenizer(root / "src")
    ibnorm.convert_checkpoint(str(src), root / "conv", ibnorm.ConvertOptions(lam=0.1))
    from ibnorm.data import read_texts

    data = root / "data.txt"  # small, so tokenising is quick
    data.write_text("\n\n".join(read_texts("builtin:pydoc:train")[:30]))
    return root / "conv", str(data), root


def _opts(data: str, out: Path, mode: str, **kw) -> FinetuneOptions:
    base = dict(data=data, eval_data=data, steps=4, seq_len=32, batch_size=4, eval_every=2, eval_blocks=4, lr=5e-3, warmup=2,
                train=mode, compare_source=False, out=str(out))
    return FinetuneOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def sharded(setup) -> dict:
    converted, data, root = setup
    jobs = [*MODES, "all:interrupt:3", "gradients"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(HERE / "fsdp_worker.py"), str(converted), data, str(root), "2", *jobs],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((root / "results.json").read_text())


@pytest.fixture(scope="module")
def single(setup) -> dict:
    converted, data, root = setup
    return {mode: finetune(str(converted), _opts(data, root / f"single-{mode}", mode, shard="none")) for mode in MODES}


def test_gloo_averages_sharded_gradients(sharded):
    # pytorch#162338 reports FSDP2 on gloo summing gradients (world × the average).  With this torch
    # (ProcessGroupGloo supports ReduceOp.AVG, pytorch#149781) they are averaged: the sharded gradient of
    # a half batch per rank equals the one-process gradient of the whole batch.  Asserted directly,
    # because AdamW is nearly blind to a constant gradient scale, so the loss sequence alone would not show it.
    g = sharded["gradients"]
    assert g["max_abs_diff"] < 1e-5 and abs(g["ratio"] - 1) < 1e-4, g
    assert abs(g["norm"] - g["reference_norm"]) < 1e-5 and abs(g["clipped"] - g["norm"] / 2) < 1e-5  # clipping scales DTensors


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_match_one_process(sharded, single, setup, mode):
    import transformers

    converted, _, root = setup
    two, one = sharded[mode], single[mode]
    assert two["world"] == 2 and len(two["losses"]) == 4
    assert max(abs(a - b) for a, b in zip(two["losses"], one.losses)) < TOL
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(two["evals"], one.evals)) < TOL
    # the consolidated output: same format, same weights as the unsharded run, loads in transformers
    sa, sb = ibnorm.load(two["out"]).state_dict(), ibnorm.load(one.out).state_dict()
    assert set(sa) == set(sb)
    assert max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa) < 1e-4
    hf = transformers.AutoModelForCausalLM.from_pretrained(two["out"])
    x = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ibnorm.load(one.out)(x).logits, atol=1e-4)
    if mode != "all":
        before = ibnorm.load(converted).state_dict()
        changed = {k for k in before if not torch.equal(before[k], sa[k])}
        assert changed and (mode == "lora" or all("norm" in k for k in changed))


def test_resume_on_another_number_of_ranks(sharded, setup):
    """Stopped at step 3 on 2 ranks (per-rank batch 2), resumed in one process (batch 4): the same global
    batches, so the loss sequence of the uninterrupted 2-rank run."""
    converted, data, root = setup
    assert sharded["all:interrupt:3"] == {"interrupted": True}
    ckpts = root / "all-resumed-checkpoints"
    assert [c.name for c in sorted(ckpts.glob("step-*"))] == ["step-0000002", "step-0000003"]
    assert (ckpts / "step-0000003" / ".metadata").is_file()  # torch.distributed.checkpoint, one file per rank
    assert len(list((ckpts / "step-0000003").glob("*.distcp"))) == 2
    out = root / "all-resumed"
    with pytest.raises(IBNormError, match="another run"):  # a foreign checkpoint (another recipe) is refused
        finetune(str(converted), _opts(data, out, "all", shard="fsdp", resume=True, lr=1e-3))
    with pytest.raises(IBNormError, match="written sharded"):
        finetune(str(converted), _opts(data, out, "all", shard="none", resume=True))
    resumed = finetune(str(converted), _opts(data, out, "all", shard="fsdp", resume=True))
    assert max(abs(a - b) for a, b in zip(resumed.losses, sharded["all"]["losses"])) < TOL
    assert resumed.losses[:3] == sharded["all"]["losses"][:3]  # restored from the checkpoint as recorded
    sa, sb = ibnorm.load(out).state_dict(), ibnorm.load(sharded["all"]["out"]).state_dict()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-4


def _param_count(c) -> dict:
    """Analytic element counts of the tiny LLaMA (tied embeddings) with per-channel λ on its 5 norms."""
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down: (in, out)
    layers, norms = c["num_hidden_layers"], 2 * c["num_hidden_layers"] + 1
    norm = 2 * h  # γ and λ
    total = c["vocab_size"] * h + layers * sum(a * b for a, b in linears) + norms * norm
    lora = layers * sum(8 * (a + b) for a, b in linears)
    return {"all": total, "norms": norms * norm, "lora": lora + norms * norm, "total": total}


@pytest.mark.parametrize("mode", MODES)
def test_plan_against_analytic_counts(setup, mode):
    converted, data, _ = setup
    c = json.loads((converted / "config.json").read_text())
    count = _param_count(c)
    opts = _opts(data, converted, mode, batch_size=2)
    fsdp = memory_plan(str(converted), opts, "fsdp", 2, gpu_memory=None)
    base = count["total"] + (count["lora"] - count["norms"] if mode == "lora" else 0)
    assert fsdp.trainable == count[mode] and fsdp.total_parameters == base
    b = fsdp.per_rank_bytes
    assert b["parameters"] == 4 * base // 2  # float32, every dim 0 even: exactly half per rank
    assert b["gradients"] == 4 * count[mode] // 2 and b["optimizer"] == 2 * 4 * count[mode] // 2  # AdamW: two float32 moments
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    assert b["activations"] == 2 * 32 * (layers * (12 * h + 4 * i) * 4 + 2 * c["vocab_size"] * 4)
    assert b["total"] == sum(v for k, v in b.items() if k != "total")
    ddp = memory_plan(str(converted), opts, "ddp", 2).per_rank_bytes
    assert ddp["parameters"] == 4 * base and ddp["optimizer"] == 2 * 4 * count[mode]


def test_plan_of_a_7b_config_without_weights(tmp_path):
    import transformers

    d = tmp_path / "llama7b"
    transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                             vocab_size=32000, dtype="bfloat16", architectures=["LlamaForCausalLM"]).save_pretrained(d)
    plan = memory_plan(str(d), FinetuneOptions(data="", train="all", batch_size=1, seq_len=2048), "fsdp", 8, gpu_memory=80 * 2**30)
    assert plan.total_parameters == 6_738_415_616  # LLaMA-7B
    assert plan.per_rank_bytes["optimizer"] == 2 * 4 * 6_738_415_616 // 8 and plan.fits


def test_plan_cli_json_and_a_run_that_does_not_fit(setup, tmp_path):
    converted, data, _ = setup
    cli = [sys.executable, "-m", "ibnorm_cli", "finetune", str(converted)]
    r = subprocess.run([*cli, "--plan", "--world-size", "2", "--shard", "fsdp", "--train", "norms", "--json"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["world_size"] == 2 and plan["fits"] is True
    assert set(plan["per_rank_bytes"]) >= {"parameters", "gradients", "optimizer", "activations", "total"}
    out = tmp_path / "out"
    r = subprocess.run([*cli, "--data", data, "--steps", "2", "--gpu-memory", "100KB", "--out", str(out)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] != []
    assert len([line for line in r.stderr.splitlines() if "error:" in line]) == 1 and "parameters" in r.stderr
    assert not out.exists() and not Path(f"{out}-checkpoints").exists()
