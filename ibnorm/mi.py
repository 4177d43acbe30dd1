"""Information-plane analysis of a model's normalization layers (``ibnorm mi``).

For every norm layer, on held-out data:

* **I(X;T)** — X is the layer's *input*, T its output.  T is a deterministic function of X, so
  I(X;T) is infinite for continuous variables; the finite, comparable quantity is
  I(X̃; T̃ + σε): both sides reduced to ``dims`` whitened principal components, and Gaussian
  noise of standard deviation σ = ``noise`` added to T̃'s (unit-variance) components.  It is
  bounded by (dims/2)·log(1 + 1/σ²) and measures how much of the input's variation survives
  the layer at that resolution: compression lowers it.
* **I(T;Y)** — Y is the next token (language models; the most frequent ``labels`` tokens, the
  rest pooled as one class) or the image label (image classifiers).  T̃ as above, no noise.

Rows are tokens (language models) or images (classifiers; feature maps mean-pooled over
space, token sequences over tokens).  Error bars: std over half-samples / √2
(``information.subsample_spread``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor, nn

from .errors import IBNormError
from .information import DEFAULT_ESTIMATOR, mutual_information, subsample_spread
from .study.normalizers import DyT
from .surgery import find_norms
from .validate import seq_len_for

if TYPE_CHECKING:
    from .charts import Chart


class MIError(IBNormError):
    pass


@dataclass
class MIOptions:
    data: str
    tokens: int = 4096  # rows (tokens) for language models
    seq_len: int | None = None  # tokens per block; None: min(256, the model's positions)
    images: int = 1000  # rows for image classifiers
    dims: int = 4
    noise: float = 0.5
    labels: int = 31  # language models: next-token classes kept (the rest pooled)
    k: int = 3
    reps: int = 8  # half-samples for the error bars (0: none)
    projection: str = "shared"  # I(X;T): "shared" projects T on X's principal axes; "own": each side on its own
    estimator: str = DEFAULT_ESTIMATOR
    seed: int = 0
    text_field: str = "text"


def _row_view(t: Tensor, per_token: bool) -> Tensor:
    """(rows, features): tokens of a (B, S, H) tensor, or pooled per-sample features."""
    t = t.detach().float()
    if per_token:
        return t.reshape(-1, t.shape[-1])
    if t.dim() == 4:  # N, C, H, W feature maps (channels first) → mean over space
        return t.mean((2, 3))
    if t.dim() == 3:  # N, tokens, D → mean over tokens
        return t.mean(1)
    return t.reshape(len(t), -1)


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every normalization layer in module order: recognized norms and IBNorm layers (converted models)."""
    from .layers import IBNormBase

    found = {site.name: site.module for site in find_norms(model)[0]}
    found.update({name: m for name, m in model.named_modules() if isinstance(m, (IBNormBase, DyT))})
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0]]))


@torch.no_grad()
def capture_norms(model: nn.Module, run: Callable[[], None], per_token: bool, keep: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Each norm's (input, output) rows while ``run()`` executes; ``keep`` selects token positions."""
    layers = norm_layers(model)
    store: dict[str, tuple[list[Tensor], list[Tensor]]] = {name: ([], []) for name in layers}
    handles = []
    for site_name, module in layers.items():
        def hook(mod: nn.Module, args: tuple, output: Tensor, _name: str = site_name) -> None:
            a, b = _row_view(args[0], per_token), _row_view(output, per_token)
            store[_name][0].append(a.half() if a.abs().max() < 6e4 else a)  # half: 4k tokens × 60 layers fit
            store[_name][1].append(b.half() if b.abs().max() < 6e4 else b)

        handles.append(module.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (ins, outs) in store.items():
        if ins:
            x, t = torch.cat([i.float() for i in ins]), torch.cat([o.float() for o in outs])
            out[name] = (x[keep], t[keep]) if keep is not None else (x, t)
    return out


def _lm_rows(loaded, opts: MIOptions) -> tuple[Tensor, Tensor, Tensor]:
    """Token blocks, the mask of positions used (all but each block's last) and their next tokens."""
    from .data import read_texts, token_examples

    if loaded.tokenizer is None:
        raise MIError(f"{loaded.source}: no tokenizer found; ibnorm mi needs one for text data")
    seq_len = seq_len_for(opts.seq_len, getattr(loaded.model, "config", None), 256)
    per_block = seq_len - 1
    blocks = token_examples(loaded.tokenizer, read_texts(opts.data, opts.text_field), seq_len,
                            max(1, -(-opts.tokens // per_block)))
    keep = torch.zeros(blocks.shape, dtype=torch.bool)
    keep[:, :-1] = True
    keep = keep.reshape(-1)
    labels = blocks[:, 1:].reshape(-1)
    idx = torch.nonzero(keep).squeeze(1)[: opts.tokens]
    mask = torch.zeros_like(keep)
    mask[idx] = True
    return blocks, mask, labels[: len(idx)]


def _images(loaded, opts: MIOptions) -> tuple[Tensor, Tensor]:
    import timm

    from .data import image_folder, load_images

    folder = image_folder(opts.data)
    if not folder.classes:
        raise MIError(f"{opts.data}: I(T;Y) needs labels: put images in one subdirectory per class")
    cfg = timm.data.resolve_data_config({}, model=loaded.model)
    rng = np.random.default_rng(opts.seed)
    if len(folder.paths) > opts.images:  # a fixed random subset, the same for every model
        pick = sorted(rng.choice(len(folder.paths), opts.images, replace=False).tolist())
        folder.paths, folder.labels = [folder.paths[i] for i in pick], [folder.labels[i] for i in pick]
    return load_images(folder, timm.data.create_transform(**cfg))


def pool_labels(y: Tensor, keep: int) -> np.ndarray:
    """The ``keep`` most frequent values as classes 0..keep-1; the rest as one more class."""
    y = y.numpy()
    values, counts = np.unique(y, return_counts=True)
    top = values[np.argsort(-counts, kind="stable")[:keep]]
    mapping = {int(v): i for i, v in enumerate(top)}
    return np.array([mapping.get(int(v), len(top)) for v in y], dtype=np.int64)


def layer_information(x: Tensor, t: Tensor, y: np.ndarray, opts: MIOptions) -> dict:
    """I(X;T) (noisy, whitened) and I(T;Y) for one layer, with half-sample error bars."""
    from .information import principal_axes, whiten

    rng = np.random.default_rng(opts.seed + 7)
    tw = whiten(t.numpy(), opts.dims)  # I(T;Y): T's own top components
    _, x_axes = principal_axes(x.numpy(), opts.dims)
    xn = whiten(x.numpy(), opts.dims, x_axes)  # once here: every estimate below sees the same projection of X
    # I(X;T): with its own projection T's top components can be other directions than X's (a layer that
    # shrinks a few huge channels reorders them), which lowers the estimate even for an invertible layer;
    # the shared projection reads T along X's axes (same dimension: a norm keeps the shape)
    t_for_x = whiten(t.numpy(), opts.dims, x_axes) if opts.projection == "shared" and t.shape[1] == x.shape[1] else tw
    t_noisy = t_for_x + opts.noise * rng.standard_normal(t_for_x.shape)

    def ixt(idx=slice(None)) -> float:
        return mutual_information(xn[idx], t_noisy[idx], estimator=opts.estimator, k=opts.k, max_dim=opts.dims, seed=opts.seed)

    def ity(idx=slice(None)) -> float:
        return mutual_information(tw[idx], y[idx], estimator=opts.estimator, k=opts.k, max_dim=opts.dims, seed=opts.seed)

    n = len(xn)
    res = {"I_XT": ixt(), "I_TY": ity(), "n": n}
    if opts.reps > 1:
        res["I_XT_err"] = subsample_spread(ixt, n, opts.reps, opts.seed)
        res["I_TY_err"] = subsample_spread(ity, n, opts.reps, opts.seed)
    return res


def _capture(loaded, opts: MIOptions, cache: dict) -> tuple[dict, np.ndarray]:
    """The norms' inputs/outputs on the data; ``cache`` shares the data between compared models."""
    model = loaded.model.eval()
    if loaded.task == "causal-lm":
        if "blocks" not in cache:
            cache["blocks"], cache["mask"], y = _lm_rows(loaded, opts)
            cache["y"] = pool_labels(y, opts.labels)
        blocks = cache["blocks"]

        def run() -> None:
            for i in range(0, len(blocks), 4):
                model(input_ids=blocks[i:i + 4])

        return capture_norms(model, run, True, cache["mask"]), cache["y"]
    if loaded.task == "image-classifier":
        if "images" not in cache:
            cache["images"], labels = _images(loaded, opts)
            cache["y"] = labels.numpy().astype(np.int64)
        images = cache["images"]

        def run_images() -> None:
            for i in range(0, len(images), 32):
                model(images[i:i + 32])

        return capture_norms(model, run_images, False), cache["y"]
    raise MIError(f"ibnorm mi needs a causal language model or an image classifier; {loaded.source} is a {loaded.task} model")


def analyze(path: str, opts: MIOptions, cache: dict | None = None, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Per-layer I(X;T), I(T;Y) of the model at ``path`` (source, converted or fine-tuned)."""
    from .loading import open_model

    cache = {} if cache is None else cache
    loaded = open_model(path)
    captured, y = _capture(loaded, opts, cache)
    if not captured:
        raise MIError(f"{path}: no normalization layers found")
    layers = []
    for i, (name, (x, t)) in enumerate(captured.items()):
        layers.append({"name": name, "module": type(loaded.model.get_submodule(name)).__name__,
                       **layer_information(x, t, y[: len(x)], opts)})
        if progress:
            progress(path, i + 1, len(captured))
    return {"model": path, "task": loaded.task, "layers": layers}


def describe(opts: MIOptions) -> dict:
    """What the numbers mean (recorded with every result)."""
    t_proj = ("X's top-{d} principal axes" if opts.projection == "shared" else "its own top-{d} principal axes").format(d=opts.dims)
    return {"estimator": opts.estimator, "units": "nats", "dims": opts.dims, "noise": opts.noise, "k": opts.k,
            "projection": opts.projection, "reps": opts.reps,
            "X": f"the norm layer's input, its top-{opts.dims} whitened principal components",
            "T": f"its output; for I(X;T) on {t_proj}, whitened, + noise σ={opts.noise}; for I(T;Y) on its own top-{opts.dims}",
            "Y": f"next token ({opts.labels} most frequent, rest pooled) / image label",
            "I_XT_bound": float(opts.dims / 2 * np.log(1 + 1 / opts.noise ** 2)),
            "error_bars": f"std over n = {opts.reps} half-samples / √2" if opts.reps > 1 else "none"}


@torch.no_grad()
def information_snapshot(model: nn.Module, input_ids: Tensor, *, dims: int = 4, noise: float = 0.5, labels: int = 31,
                         every_layer: int = 1, estimator: str = DEFAULT_ESTIMATOR, seed: int = 0) -> dict:
    """I(X;T), I(T;Y) per norm layer of a causal LM on one fixed batch ``input_ids`` (B, S).

    For a training loop: call every N steps with the same held-out batch and append
    ``{"step": step, "mi": snapshot}`` to metrics.jsonl; ``ibnorm mi --trajectory`` plots it.
    ``every_layer`` keeps every k-th norm (cost is linear in layers).
    """
    was_training = model.training
    model.eval()
    try:
        keep = torch.zeros(input_ids.shape, dtype=torch.bool)
        keep[:, :-1] = True
        captured = capture_norms(model, lambda: model(input_ids=input_ids), True, keep.reshape(-1).cpu())
    finally:
        model.train(was_training)
    y = pool_labels(input_ids[:, 1:].reshape(-1).cpu(), labels)
    opts = MIOptions(data="", dims=dims, noise=noise, labels=labels, reps=0, estimator=estimator, seed=seed)
    names = list(captured)[::every_layer]
    return {name: {k: v for k, v in layer_information(*captured[name], y, opts).items() if k != "n"} for name in names}


def read_trajectory(path: str) -> list[dict]:
    """``{"step", "mi"}`` records of a metrics.jsonl (other lines are skipped)."""
    p = Path(path)
    if not p.is_file():
        raise MIError(f"trajectory file not found: {path}")
    out = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise MIError(f"{path}:{lineno}: not valid JSON") from None
        if isinstance(rec, dict) and "mi" in rec and "step" in rec:
            out.append(rec)
    if not out:
        raise MIError(f"{path}: no information snapshots (lines with \"step\" and \"mi\"); record them with finetune --mi-every")
    return out


def plane_chart(results: list[dict]) -> "Chart":
    """One point per layer (error bars), one colour per model, grey arrows from each model to the next."""
    from .charts import Chart, Series

    series = []
    for r in results:
        lay = r["layers"]
        series.append(Series(Path(r["model"]).name or r["model"], [v["I_XT"] for v in lay], [v["I_TY"] for v in lay],
                             [v["I_TY"] - v.get("I_TY_err", 0.0) for v in lay], [v["I_TY"] + v.get("I_TY_err", 0.0) for v in lay],
                             points=True, xerr=[v.get("I_XT_err", 0.0) for v in lay]))
    links = []
    for a, b in zip(results, results[1:]):
        nb = {v["name"]: v for v in b["layers"]}
        links += [(v["I_XT"], v["I_TY"], nb[v["name"]]["I_XT"], nb[v["name"]]["I_TY"]) for v in a["layers"] if v["name"] in nb]
    return Chart("information plane: one point per norm layer", "I(X;T) [nats]", "I(T;Y) [nats]", series, links=links)


def trajectory_chart(records: list[dict], max_layers: int = 8) -> "Chart":
    """I(T;Y) against I(X;T) along training for up to ``max_layers`` layers (evenly spread), arrows by step."""
    from .charts import Chart, Series

    names = list(records[-1]["mi"])
    names = names[:: max(1, -(-len(names) // max_layers))]
    series = []
    for name in names:
        pts = [(r["mi"][name]["I_XT"], r["mi"][name]["I_TY"]) for r in records if name in r["mi"]]
        if pts:
            series.append(Series(name, [p[0] for p in pts], [p[1] for p in pts], points=True,
                                 arrows=[(i, i + 1) for i in range(len(pts) - 1)]))
    first, last = records[0]["step"], records[-1]["step"]
    return Chart(f"information plane along training, steps {first} → {last} (arrows follow the steps)", "I(X;T) [nats]",
                 "I(T;Y) [nats]", series)
