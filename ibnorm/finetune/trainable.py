"""Which parameters a fine-tune trains (``--train norms|all|lora``)."""

from __future__ import annotations

from torch import nn

from ..layers import IBNormBase


def select_trainable(model: nn.Module, mode: str, lora_rank: int) -> nn.Module:
    """Freeze what does not train.  IBNorm λ always becomes learnable; a model without IBNorm
    (the baseline fine-tune of a source model) trains its original norms in ``norms`` mode."""
    from ..surgery import find_norms

    for m in model.modules():
        if isinstance(m, IBNormBase) and not m.lam_is_learnable:
            m.set_lambda(m.lam.detach(), learnable=True)
    for p in model.parameters():
        p.requires_grad_(mode == "all")
    if mode == "all":
        return model
    norms = [m for m in model.modules() if isinstance(m, IBNormBase)] or [s.module for s in find_norms(model)[0]]
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear", lora_dropout=0.0))
    for m in norms:
        for p in m.parameters(recurse=False):
            p.requires_grad_(True)
    return model
