# Sourced by the scripts of tools/gpu: $out (the run's $OUT), the project's wheels importable
# (from $WHL, default .whl: megatron-core, hydra-core, omegaconf, antlr4, mosaicml-streaming and
# its imports, nvidia-cudnn-frontend; installed into /tmp/site unless they import already), and
# PYTHONPATH with Transformer Engine where tools/gpu/install_te.sh put it (/tmp/te; absent: no TE),
# the wheels, the checkout and its tools/.
out=${OUT:-/tmp/out}
mkdir -p "$out"
if ! python3 -c "import megatron.core, hydra, streaming" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "${WHL:-.whl}"/*.whl || exit 1
fi
export PYTHONPATH=/tmp/te:/tmp/site:$PWD:$PWD/tools${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
