#!/usr/bin/env bash
# Transformer Engine 2.20.2 (PyTorch, CUDA 13) on a lent GPU machine that has no network.
#
# The core wheel (transformer-engine-cu13, 276 MB) is larger than what one `run` call may carry
# (64 MiB), so it travels split in parts, one part per call, each stashed in the machine's /tmp
# (kept while the machine stays warm: 30 s between calls). The last call joins the parts, installs
# everything with `pip --no-deps --target /tmp/te` and builds TE's PyTorch extension from its sdist
# (C++ only, ~2 min with 16 jobs).
#
#   here (network):   tools/gpu/install_te.sh download        # -> .te/c1 ... .te/cN (git-ignored)
#   device, call k:   run(carry=[".te/ck"], command="bash tools/gpu/install_te.sh stash .te/ck")
#                     for k = 1 .. N-1, back to back
#   device, call N:   run(carry=[".te/cN"], command="bash tools/gpu/install_te.sh stash .te/cN &&
#                         bash tools/gpu/install_te.sh install && export PYTHONPATH=/tmp/te:\$PYTHONPATH
#                         && <what needs TE>")
#
# `install` checks the joined wheel's sha256 and ends with an import of transformer_engine.pytorch.
set -euo pipefail

TE_VERSION=${TE_VERSION:-2.20.2}
DIR=${TE_DIR:-.te}
STASH=/tmp/te_parts
TARGET=${TE_TARGET:-/tmp/te}
PART_MB=${TE_PART_MB:-50}

cmd=${1:-}
case "$cmd" in
download)
  mkdir -p "$DIR/dl"
  grep -qx "/$DIR/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$DIR/" >> .git/info/exclude; }
  plat="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: $plat -d "$DIR/dl" \
    "transformer-engine-cu13==$TE_VERSION" "transformer-engine==$TE_VERSION" \
    nvidia-cudnn-frontend pydantic pydantic-core annotated-types typing-inspection \
    typing-extensions importlib-metadata nvdlfw-inspect
  # the sdist: `pip download` would try to build its metadata (needs torch), so take the file
  # straight from the index
  sdist="transformer_engine_torch-$TE_VERSION.tar.gz"
  if [ ! -f "$DIR/dl/$sdist" ]; then
    url=$(curl -fsS https://pypi.org/simple/transformer-engine-torch/ \
      | grep -o "href=\"[^\"]*$sdist[^\"]*\"" | head -1 | sed 's/^href="//; s/"$//')
    curl -fsS -o "$DIR/dl/$sdist" "${url%%#*}"
    want=${url##*#sha256=}
    echo "$want  $DIR/dl/$sdist" | sha256sum -c -
  fi
  core=$(ls "$DIR"/dl/transformer_engine_cu13-"$TE_VERSION"-*.whl)
  rm -rf "$DIR"/c[0-9]*
  mkdir -p "$DIR/split"
  rm -f "$DIR"/split/*
  split -b "${PART_MB}M" -d -a 2 "$core" "$DIR/split/core.part"
  n=0
  for p in "$DIR"/split/core.part*; do
    n=$((n + 1)); mkdir -p "$DIR/c$n"; mv "$p" "$DIR/c$n/"
  done
  # the last call also carries the small files and the checksum of the joined core wheel
  for f in "$DIR"/dl/*; do [ "$f" = "$core" ] || cp "$f" "$DIR/c$n/"; done
  (cd "$(dirname "$core")" && sha256sum "$(basename "$core")") > "$DIR/c$n/CORE.sha256"
  rmdir "$DIR/split"
  du -sh "$DIR"/c*
  echo "carry one per call, in order: $(cd "$DIR" && ls -d c* | sort -V | sed "s|^|$DIR/|" | tr '\n' ' ')"
  ;;
stash)
  src=${2:?stash needs the carried folder, e.g. .te/c1}
  mkdir -p "$STASH"
  cp -r "$src"/. "$STASH"/
  ls -la "$STASH"
  ;;
install)
  t0=$(date +%s)
  cd "$STASH"
  core=$(awk '{print $2}' CORE.sha256)
  cat core.part* > "$core"
  sha256sum -c CORE.sha256
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$TARGET" ./*.whl
  export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
  rm -rf /tmp/te_build /tmp/te_torch_build && mkdir -p /tmp/te_build
  tar xzf transformer_engine_torch-*.tar.gz -C /tmp/te_build
  # no network there: NVTE_PYTORCH_FORCE_BUILD skips the try at a prebuilt wheel from GitHub
  MAX_JOBS=${MAX_JOBS:-16} NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE \
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} \
    python3 -m pip install -q --no-index --no-build-isolation --no-deps --no-cache-dir \
    --target /tmp/te_torch_build /tmp/te_build/transformer_engine_torch-*/
  # a second `pip --target` into the same folder skips top-level folders that exist already
  # (transformer_engine/), so build into its own folder and merge
  ls /tmp/te_torch_build
  cp -a /tmp/te_torch_build/. "$TARGET"/
  python3 -c "import transformer_engine as te, transformer_engine.pytorch as tep; \
print('transformer_engine', te.__version__, 'at', te.__file__)"
  echo "TE installed in $TARGET in $(( $(date +%s) - t0 )) s; use: export PYTHONPATH=$TARGET:\$PYTHONPATH"
  ;;
*)
  echo "usage: $0 download | stash DIR | install" >&2
  exit 2
  ;;
esac
