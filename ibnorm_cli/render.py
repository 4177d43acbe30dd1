"""Rendering shared by the commands: tables that fit the terminal, short names, numbers, JSON, one-line errors.

Designed for 80 columns without a TTY: tables have no vertical rules, cells wrap at spaces only (a word
that cannot fit is cut with an ellipsis, never broken across lines), numeric cells never wrap, and
module names are shortened to the part that tells them apart.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import typer
from rich import box
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[int] = ()) -> Table:
    """A table for the terminal; ``numeric``: indices of right-aligned, never-wrapped columns."""
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for i, col in enumerate(columns):
        t.add_column(col, justify="right" if i in numeric else "left", no_wrap=i in numeric)
    for row in rows:
        t.add_row(*(fmt(v) for v in row))
    return t


def pairs(title: str, rows: Sequence[tuple[str, Any]]) -> Table:
    """A two-column key/value table (no header)."""
    t = Table(title=title, title_justify="left", box=None, show_header=False, pad_edge=False)
    t.add_column("", style="bold", no_wrap=True)
    t.add_column("")
    for k, v in rows:
        t.add_row(k, fmt(v))
    return t


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return num(v)
    return str(v)


def num(v: float, digits: int = 3) -> str:
    """A number in at most about 8 characters: fixed point when readable, else scientific (6.4e-04)."""
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    a = abs(v)
    if a == 0 or 1e-3 <= a < 1e5:
        return f"{v:.{digits}g}" if a >= 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return f"{v:.1e}"


def pct(share: float) -> str:
    """A share as a percentage that never says 0% or 100% when it is not."""
    p = 100 * share
    if 0 < p < 1:
        return "<1%"
    if 99 < p < 100:
        return ">99%"
    return f"{p:.0f}%"


def short_names(names: Sequence[str]) -> dict[str, str]:
    """Each dotted module name shortened to what tells it apart: the components every name shares at
    its start go, and so does the path of the repeated blocks (``layers``) before a block number:
    ``model.layers.28.post_attention_layernorm`` → ``28.post_attention_layernorm``, ``model.norm`` → ``norm``."""
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    parts = [p[common:] for p in parts]
    block_paths = {tuple(p[:k]) for p in parts for k in range(1, len(p)) if p[k].isdigit()}
    if len(block_paths) == 1:  # one stack of numbered blocks: its path says nothing
        (path,) = block_paths
        shorter = [p[len(path):] if tuple(p[: len(path)]) == path and p[len(path)].isdigit() else p for p in parts]
        if len({".".join(p) for p in shorter}) == len(names):
            parts = shorter
    return {n: ".".join(p) for n, p in zip(names, parts)}


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def quiet_libraries() -> None:
    """One progress display: ibnorm's own.  The bars of the libraries it drives (transformers' "Writing
    model shards", its GGUF reader's plain tqdm, huggingface_hub's downloads) and their advisories
    are silenced.  TQDM_DISABLE must be set before tqdm is first imported (it reads it once)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import huggingface_hub.utils
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected failures into one red line and a non-zero exit code."""
    from ibnorm.errors import IBNormError

    try:
        yield
    except IBNormError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        err_console.print(f"[red]error:[/red] {e.strerror or e}: {e.filename}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None


# ----------------------------------------------------------------------------- convert

STANDOUT_ROWS = 5  # layers named in the default summary; the rest: --layers


def _channels(layer: dict) -> int:
    n = 1
    for d in layer["lam_shape"]:
        n *= d
    return n


def conversion_summary(manifest: dict) -> Table:
    """Per grouping and op: layers, λ mean and range, the share of channels at λ = 0, the worst error."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for layer in manifest["layers"]:
        groups.setdefault((layer["grouping"], layer["op"]), []).append(layer)
    rows = []
    for (grouping, op), layers in groups.items():
        channels = sum(_channels(l) for l in layers)
        mean = sum(l["lam_mean"] * _channels(l) for l in layers) / channels
        zero = sum(l["frac_lam_zero"] * _channels(l) for l in layers) / channels
        low, high = min(l["lam_min"] for l in layers), max(l["lam_max"] for l in layers)
        rows.append((grouping, op, len(layers), num(mean), f"{num(low)}–{num(high)}", pct(zero),
                     num(max(l["error"] for l in layers))))
    title = f"{len(manifest['layers'])} normalization layers converted (each one: --layers)"
    return table(title, ("grouping", "op", "layers", "λ mean", "λ range", "λ = 0", "worst error"), rows,
                 numeric=(2, 3, 4, 5, 6))


def standouts(manifest: dict) -> list[tuple[str, str]]:
    """(layer, why) for the layers that differ from the rest: λ = 0 throughout while others compress,
    or a few channels held at λ = 0 — outlier (massive) activations that compression would distort."""
    layers, names = manifest["layers"], short_names([l["name"] for l in manifest["layers"]])
    compressing = any(l["lam_max"] > 0 for l in layers)
    found = []
    for l in layers:
        c = _channels(l)
        zeros = round(l["frac_lam_zero"] * c)
        if compressing and zeros == c and c > 1:
            found.append((2 * c, names[l["name"]], "λ = 0 in every channel: kept as the source"))
        elif 0 < zeros <= max(1, c // 20):
            found.append((zeros, names[l["name"]], f"{zeros} of {c} channels at λ = 0 (outlier activations)"))
    found.sort(key=lambda f: -f[0])
    return [(name, why) for _, name, why in found]


def layer_table(manifest: dict) -> Table:
    names = short_names([l["name"] for l in manifest["layers"]])
    rows = [(names[l["name"]], num(l["lam_mean"]), f"{num(l['lam_min'])}–{num(l['lam_max'])}", pct(l["frac_lam_zero"]),
             num(l["error"])) for l in manifest["layers"]]
    return table("normalization layers", ("layer", "λ mean", "λ range", "λ = 0", "calib. error"), rows, numeric=(1, 2, 3, 4))


def render_conversion(manifest: dict, out: Any, show_layers: bool) -> None:
    """What ``convert`` prints: the summary, the layers that stand out (all with ``show_layers``), the outcome."""
    if not manifest["layers"]:
        console.print("no normalization layer converted")
    elif show_layers:
        console.print(layer_table(manifest))
    else:
        console.print(conversion_summary(manifest))
        found = standouts(manifest)
        if found:
            more = f"; {len(found) - STANDOUT_ROWS} more with --layers" if len(found) > STANDOUT_ROWS else ""
            console.print(table(f"layers that stand out{more}", ("layer", "why"), found[:STANDOUT_ROWS]))
    notes = {l["note"] for l in manifest["layers"] if l.get("note")}
    for note in sorted(notes):
        console.print(f"note: {note}", highlight=False)
    if manifest["skipped"]:
        names = short_names([s["name"] for s in manifest["skipped"]])
        console.print(table("skipped", ("layer", "class", "reason"),
                            [(names[s["name"]], s["source_class"].rsplit(".", 1)[-1], s["reason"]) for s in manifest["skipped"]]))
    console.print(pairs("conversion", _outcome(manifest, out)))


def _outcome(manifest: dict, out: Any) -> list[tuple[str, str]]:
    cal = manifest["calibration"]
    if cal["mode"] == "data":
        amount = f"{cal['tokens']} tokens" if cal.get("tokens") else f"{cal.get('images')} images"
        rows = [("calibration", f"{cal.get('data')}, {amount}")]
    else:
        rows = [("calibration", cal["mode"]), ("assumption", cal.get("assumption", ""))]
    e2e = manifest.get("end_to_end") or {}
    if e2e.get("note"):
        rows.append(("end-to-end", e2e["note"]))
    elif e2e:
        backoff = "" if e2e["backoff_factor"] == 1 else f"; every λ backed off ×{num(e2e['backoff_factor'])}"
        rows.append(("end-to-end", f"{e2e['metric']} {num(e2e['value'])} (budget {num(e2e['budget'])}){backoff}"))
    ev = manifest.get("evaluation") or {}
    if ev:
        change = f" ({100 * ev['relative_change']:+.2f}%)" if "relative_change" in ev else ""
        rows.append((ev["metric"], f"{ev['source']:.3f} → {ev['converted']:.3f}{change}"))  # same decimals both sides
    rows.append(("time", f"{manifest['seconds']:.1f} s"))
    rows.append(("written", str(out)))
    return rows
