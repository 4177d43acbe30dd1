"""What a user sees (issue 22): commands in workflow order, one option name per idea, defaults that
adapt to the model, special files refused at once, advice that works as typed, output that fits 80
columns without a TTY and in a real terminal."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models import tiny_lm_with_tokenizer

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
WORKFLOW = ["convert", "inspect", "eval", "finetune", "export", "study", "mi", "upgrade", "clean", "ops"]
# A refusal must come at once: a hang (a FIFO opened for reading) fails the test instead of the run.
REFUSAL_SECONDS = 300


def ibnorm(*args: str, columns: int = 80, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
    """The CLI as a user in a non-interactive 80-column terminal runs it (stdout a pipe)."""
    return subprocess.run([sys.executable, "-m", "ibnorm_cli", *args], capture_output=True, text=True,
                          env={**ENV, "COLUMNS": str(columns)}, timeout=timeout, cwd=cwd)


def assert_one_line_error(r: subprocess.CompletedProcess, fragment: str) -> None:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert fragment in lines[0], lines[0]


def set_positions(model_dir: Path, n: int) -> Path:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["max_position_embeddings"] = n
    (model_dir / "config.json").write_text(json.dumps(cfg))
    return model_dir


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    """A tiny Llama with a tokenizer and only 256 positions (rotary: the limit is the config's number)."""
    return set_positions(tiny_lm_with_tokenizer(tmp_path_factory.mktemp("lm") / "tiny-lm"), 256)


@pytest.fixture(scope="module")
def converted(lm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "tiny-lm-ib"
    r = ibnorm("convert", str(lm), "--lam", "0.2", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    return out


# ----------------------------------------------------------------------------- A. structure, names, defaults


def test_help_lists_commands_in_workflow_order():
    from ibnorm_cli.main import COMMANDS

    assert [name for name, _ in COMMANDS] == WORKFLOW
    out = ibnorm("--help").stdout
    section = out[out.index("Commands"):]
    positions = [re.search(rf"^\W*{name}\s", section, re.M) for name in WORKFLOW]
    assert all(positions), section
    assert [m.start() for m in positions] == sorted(m.start() for m in positions), section


def test_command_modules_do_not_import_main():
    """One place registers the commands; the modules it imports never import it back."""
    for f in (ROOT / "ibnorm_cli").glob("*.py"):
        if f.name in ("main.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("main", "ibnorm_cli.main") and not (node.level and node.module == "main"), f
            if isinstance(node, ast.Attribute) and node.attr == "command" and getattr(node.value, "id", "") == "app":
                raise AssertionError(f"{f.name} registers a command itself")


def test_old_option_names_are_hidden_aliases(lm, tmp_path):
    help_eval = ibnorm("eval", "--help").stdout
    assert "--eval-tokens" in help_eval and "--max-tokens" not in help_eval and "--seq-len" in help_eval
    help_ft = ibnorm("finetune", "--help").stdout
    assert "--eval " in help_ft and "--eval-data" not in help_ft
    common = ["eval", str(lm), "--data", "builtin:pydoc:eval", "--seq-len", "32", "--json"]
    new = json.loads(ibnorm(*common, "--eval-tokens", "256").stdout)
    old = json.loads(ibnorm(*common, "--max-tokens", "256").stdout)
    assert new == old and new["tokens"] <= 256
    # finetune's --eval-data still names the held-out data: the same refusal as --eval
    missing = str(tmp_path / "missing.txt")
    for spelling in ("--eval", "--eval-data"):
        r = ibnorm("finetune", str(lm), "--data", "builtin:pydoc:train", spelling, missing, "--out", str(tmp_path / "o"))
        assert_one_line_error(r, "missing.txt")


def test_seq_len_default_adapts_to_the_model(lm, tmp_path):
    """A 256-position model: eval's 512-token default window becomes 256; an explicit 512 is refused."""
    r = ibnorm("eval", str(lm), "--data", "builtin:pydoc:eval", "--eval-tokens", "1024", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["window"] == 256
    assert_one_line_error(ibnorm("eval", str(lm), "--data", "builtin:pydoc:eval", "--seq-len", "512"), "256 positions")
    small = set_positions(tiny_lm_with_tokenizer(tmp_path / "p128"), 128)  # convert's default 256 → 128
    r = ibnorm("convert", str(small), "--calib", "builtin:pydoc:train", "--calib-samples", "4", "--out", str(tmp_path / "o"),
               "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["calibration"]["seq_len"] == 128


# ----------------------------------------------------------------------------- B. special files


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _socket(path: Path) -> tuple[Path, socket.socket]:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    return path, s


def _refused_at_once(args: list[str], fragment: str) -> None:
    t = time.monotonic()
    try:
        r = ibnorm(*args, timeout=REFUSAL_SECONDS)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"ibnorm {' '.join(args)} hung on a special file") from None
    assert_one_line_error(r, fragment)
    assert time.monotonic() - t < REFUSAL_SECONDS


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_special_files_refused_before_opening(kind, lm, converted, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    if kind == "fifo":
        special, fragment, holder = _fifo(work / "special"), "FIFO", None
    else:
        special, holder = _socket(work / "special")
        fragment = "socket"
    try:
        model_dir = tmp_path / "model"  # a model directory whose weights file is the special file
        model_dir.mkdir()
        for f in lm.iterdir():
            if f.name != "model.safetensors":
                shutil.copy(f, model_dir / f.name)
        os.rename(special, model_dir / "model.safetensors")
        special = model_dir / "model.safetensors"
        out = str(tmp_path / "out")
        _refused_at_once(["convert", str(model_dir), "--lam", "0.1", "--out", out], fragment)
        _refused_at_once(["convert", str(lm), "--calib", str(special), "--out", out], fragment)
        _refused_at_once(["inspect", str(special)], fragment)
        _refused_at_once(["inspect", str(model_dir)], fragment)
        _refused_at_once(["eval", str(model_dir), "--data", "builtin:pydoc:eval"], fragment)
        _refused_at_once(["eval", str(converted), "--data", str(special)], fragment)
        _refused_at_once(["finetune", str(converted), "--data", str(special), "--out", out], fragment)
        _refused_at_once(["mi", str(converted), "--data", str(special)], fragment)
        _refused_at_once(["mi", str(model_dir), "--data", "builtin:pydoc:eval"], fragment)
        assert not Path(out).exists()
    finally:
        if holder is not None:
            holder.close()


# ----------------------------------------------------------------------------- C. advice as typed


def advised_commands(text: str) -> list[list[str]]:
    """The commands a message tells the user to run: `ibnorm …` or `hf …` in backticks."""
    return [shlex.split(c) for c in re.findall(r"`((?:ibnorm|hf) [^`]+)`", text)]


def test_offline_advice_is_an_installed_command(tmp_path):
    r = ibnorm("convert", "someorg/not-a-cached-model", "--out", str(tmp_path / "o"))
    assert_one_line_error(r, "someorg/not-a-cached-model")
    advice = advised_commands(r.stderr)
    assert advice == [["hf", "download", "someorg/not-a-cached-model"]], r.stderr
    hf = shutil.which("hf", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert hf is not None, "the installed huggingface_hub has no `hf` command"
    usage = subprocess.run([hf, *advice[0][1:2], "--help"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and "REPO_ID" in usage.stdout, usage.stderr


def test_follow_up_commands_run_as_typed(converted, tmp_path):
    """Converting a converted directory advises `ibnorm finetune DIR`: that exact command runs."""
    r = ibnorm("convert", str(converted), "--lam", "0.1", "--out", str(tmp_path / "again"))
    assert_one_line_error(r, "already an ibnorm conversion")
    (advice,) = advised_commands(r.stderr)
    assert advice[:2] == ["ibnorm", "finetune"] and advice[2] == str(converted)
    out = tmp_path / "ft"
    r = ibnorm(*advice[1:], "--steps", "2", "--eval-every", "2", "--seq-len", "32", "--batch-size", "2", "--no-source",
               "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 2 and (out / "ibnorm_manifest.json").is_file()


# ----------------------------------------------------------------------------- D. output for a terminal

WIDTH = 80


def assert_fits(text: str, whole: list[str] = ()) -> None:
    """No line wider than the terminal; each of ``whole`` (names, numbers, headers) on one line, unbroken."""
    lines = text.splitlines()
    wide = [l for l in lines if len(l.rstrip()) > WIDTH]
    assert not wide, "\n".join(wide)
    for w in whole:
        assert any(w in l for l in lines), f"{w!r} is not on one line of:\n{text}"
    assert "it/s]" not in text and "Writing model shards" not in text  # no library progress bars


def run80(*args: str, **kw) -> subprocess.CompletedProcess:
    r = ibnorm(*args, **kw)
    assert r.returncode == 0, r.stderr
    assert_fits(r.stdout)
    assert_fits(r.stderr)
    return r


@pytest.fixture(scope="module")
def calibrated(lm, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("cal") / "tiny-lm-cal"
    r = run80("convert", str(lm), "--calib", "builtin:pydoc:train", "--calib-samples", "8", "--seq-len", "64",
              "--eval", "builtin:pydoc:eval", "--eval-tokens", "256", "--out", str(out))
    return out, r


def test_convert_prints_a_summary_that_fits(calibrated):
    from ibnorm_cli.render import short_names

    out, r = calibrated
    manifest = json.loads((out / "ibnorm_manifest.json").read_text())
    layers = manifest["layers"]
    worst = max(l["error"] for l in layers)
    from ibnorm_cli.render import num

    assert_fits(r.stdout, ["grouping", "λ mean", "worst error", str(len(layers)), num(worst), "end-to-end", "perplexity",
                           str(out)])
    short = short_names([l["name"] for l in layers])
    assert all(not n.startswith("model.") for n in short.values())
    assert not any(l["name"] in r.stdout for l in layers)  # full names never printed


def test_convert_layers_flag_prints_every_layer(lm, calibrated, tmp_path):
    from ibnorm_cli.render import short_names

    out, _ = calibrated
    r = run80("convert", str(lm), "--lam", "0.25", "--out", str(tmp_path / "o"), "--layers")
    manifest = json.loads((tmp_path / "o" / "ibnorm_manifest.json").read_text())
    names = list(short_names([l["name"] for l in manifest["layers"]]).values())
    assert_fits(r.stdout, names + ["calib. error"])
    default = run80("convert", str(lm), "--lam", "0.25", "--out", str(tmp_path / "o2"))
    assert sum(n in default.stdout for n in names) < len(names)  # the default lists only layers that stand out
    j = ibnorm("convert", str(lm), "--lam", "0.25", "--out", str(tmp_path / "o3"), "--json")
    assert len(json.loads(j.stdout)["layers"]) == len(manifest["layers"])  # --json: always every layer


def test_every_command_fits_80_columns(lm, converted, calibrated, tmp_path):
    out, _ = calibrated
    for cmd in WORKFLOW:
        run80(cmd, "--help")
    run80("--help")
    run80("inspect", str(out), "--layers")
    run80("inspect", str(lm / "model.safetensors"))
    run80("eval", str(out), "--data", "builtin:pydoc:eval", "--eval-tokens", "256", "--compare", str(lm))
    run80("eval", str(converted), "--data", "builtin:pydoc:eval", "--eval-tokens", "256")
    run80("finetune", str(converted), "--data", "builtin:pydoc:train", "--steps", "2", "--eval-every", "2", "--seq-len", "32",
          "--batch-size", "2", "--no-source", "--out", str(tmp_path / "ft"))
    run80("mi", str(converted), "--compare", str(out), "--data", "builtin:pydoc:eval", "--tokens", "300", "--seq-len", "32",
          "--reps", "0", "--plot", str(tmp_path / "plane.png"))
    run80("study", "--preset", "micro", "--out", str(tmp_path / "study"))
    run80("upgrade", str(out))
    run80("clean", str(tmp_path))
    run80("ops")


def test_convert_in_a_real_terminal(lm, tmp_path):
    """tmux gives the command a real 80-column terminal: rich draws its progress; afterwards the pane
    (wrapped lines joined) holds no line wider than 80 and no library progress bar."""
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux not installed")
    server = f"ibnorm-test-{os.getpid()}"
    done = tmp_path / "done"
    cmd = (f"{shlex.quote(sys.executable)} -m ibnorm_cli convert {shlex.quote(str(lm))} --calib builtin:pydoc:train "
           f"--calib-samples 8 --seq-len 64 --out {shlex.quote(str(tmp_path / 'o'))}; echo $? > {shlex.quote(str(done))}; sleep 600")
    env = {**ENV, "TERM": "xterm-256color"}
    env.pop("COLUMNS", None)
    subprocess.run([tmux, "-L", server, "new-session", "-d", "-x", str(WIDTH), "-y", "60", cmd], check=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert done.exists() and done.read_text().strip() == "0"
        pane = subprocess.run([tmux, "-L", server, "capture-pane", "-p", "-J", "-S", "-"], capture_output=True, text=True,
                              check=True).stdout
    finally:
        subprocess.run([tmux, "-L", server, "kill-server"], capture_output=True)
    assert_fits(pane, ["grouping", "λ mean", "worst error", "end-to-end"])
