"""Tiny models trained from scratch by the study: a LLaMA decoder, a ResNet and a ViT."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class TinyResNet(nn.Module):
    """ResNet-style CNN: stem, ``len(widths)`` stages of basic blocks, global pooling, linear head."""

    def __init__(self, in_ch: int, classes: int, widths: tuple[int, ...] = (16, 32), blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Pre-norm ViT: patch embedding, class token, learned positions, LayerNorm blocks and head norm."""

    def __init__(self, image: int, patch: int, in_ch: int, classes: int, dim: int = 64, depth: int = 4,
                 heads: int = 4, mlp: int = 128) -> None:
        super().__init__()
        self.embed = nn.Conv2d(in_ch, dim, patch, patch)
        n = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def tiny_llama(vocab: int, dim: int, layers: int, heads: int, ffn: int, max_len: int) -> nn.Module:
    """A LLaMA decoder (transformers' implementation: RMSNorm, SwiGLU, rotary positions)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_len,
                                   rms_norm_eps=1e-6, tie_word_embeddings=True, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg)


def build_model(task: dict) -> nn.Module:
    kind, m = task["kind"], task["model"]
    if kind in ("cnn", "vit"):
        from .data import image_shape

        channels, classes, side = image_shape(task)
        if kind == "cnn":
            return TinyResNet(channels, classes, tuple(m["widths"]), m.get("blocks", 1))
        return TinyViT(side, m["patch"], channels, classes, m["dim"], m["depth"], m["heads"], m["mlp"])
    if kind == "lm":
        from .data import vocab_size

        return tiny_llama(vocab_size(task.get("tokenizer")), m["dim"], m["layers"], m["heads"], m["ffn"], task["seq_len"])
    raise ValueError(f"unknown task kind {kind!r}")
