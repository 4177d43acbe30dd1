"""Find the normalization layers of a model and replace them (``from_module`` for one module).

Knows nothing of kernels."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import Tensor, nn

from .layers import IBNormBase, from_spec
from .recognize import NormSpec, recognize


@dataclass
class NormSite:
    """One normalization layer found in a model."""

    name: str
    module: nn.Module
    spec: NormSpec


@dataclass
class SkippedNorm:
    name: str
    source_class: str
    reason: str


def _matches(name: str, pattern: str) -> bool:
    """Glob on the module name; a pattern without wildcards matches as a substring."""
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def find_norms(
    model: nn.Module, only: Sequence[str] = (), exclude: Sequence[str] = ()
) -> tuple[list[NormSite], list[SkippedNorm]]:
    """Every recognized norm in ``model`` (in module order), and those skipped with a reason."""
    sites: list[NormSite] = []
    skipped: list[SkippedNorm] = []
    for name, module in model.named_modules(remove_duplicate=True):
        spec = recognize(module)
        if spec is None:
            continue
        if only and not any(_matches(name, p) for p in only):
            skipped.append(SkippedNorm(name, spec.source_class, "not selected by --only"))
        elif any(_matches(name, p) for p in exclude):
            skipped.append(SkippedNorm(name, spec.source_class, "excluded by --exclude"))
        elif spec.skip_reason:
            skipped.append(SkippedNorm(name, spec.source_class, spec.skip_reason))
        else:
            sites.append(NormSite(name, module, spec))
    return sites, skipped


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_norms(model: nn.Module, sites: Sequence[NormSite], build: Callable[[NormSite], nn.Module]) -> dict[str, nn.Module]:
    """Replace each site by ``build(site)``; a module shared by several names stays shared."""
    built: dict[int, nn.Module] = {}
    replaced: dict[str, nn.Module] = {}
    for site in sites:
        key = id(site.module)
        if key not in built:
            new = build(site)
            new.train(site.module.training)
            built[key] = new
        replaced[site.name] = built[key]
    # Shared modules appear under several names; set every alias.
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in built and name:
            set_submodule(model, name, built[id(module)])
    return replaced


def from_module(
    norm_module: nn.Module,
    *,
    op: str = "tanh",
    lam: "float | Tensor" = 0.0,
    grouping: str = "auto",
    learnable_lam: bool = False,
) -> IBNormBase:
    """The IBNorm equivalent of ``norm_module``.

    Copies weight, bias, eps, normalized shape, running statistics, device, dtype
    and train/eval mode; ``grouping="auto"`` keeps the source's grouping.  At
    ``lam=0`` the result computes the same function as the source.

    Raises ``TypeError`` for modules that are not a recognized normalization layer.
    """
    spec = recognize(norm_module)
    if spec is None:
        raise TypeError(f"{type(norm_module).__qualname__} is not a normalization layer ibnorm can convert")
    module = from_spec(spec, op=op, lam=lam, grouping=grouping, learnable_lam=learnable_lam)
    module.train(norm_module.training)
    return module
