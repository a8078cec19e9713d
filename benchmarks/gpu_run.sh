#!/usr/bin/env bash
# The GPU benchmarks (accelerator.py, population.py --devices=0) on a machine
# that reaches no package registry, such as the lent GPU machine, whose image
# has jax 0.11 (CUDA), flax, optax, orbax, PyTorch, matplotlib, tensorboard
# ... but not clu nor ml_collections. Two steps:
#
#   benchmarks/gpu_run.sh --build-wheelhouse   # here, where pip reaches the
#                                              # registry: fills the wheelhouse
#   benchmarks/gpu_run.sh [--tiny]             # there, from the repository root
#
# --build-wheelhouse downloads (pip download --no-deps) the wheels of exactly
# the packages the image lacks, at the versions of requirements.lock, into
# benchmarks/wheelhouse/ (git-ignored, 180 KB: carry it with the working
# tree). More NAME==VERSION arguments add more wheels (binary ones are taken
# for $WHEEL_PYTHON_VERSION, default 3.12, manylinux x86-64: the image's).
#
# The run (1) installs each wheel of the wheelhouse whose package the Python
# lacks, with pip --no-index --no-deps into a folder of its own ($SITE, put
# on PYTHONPATH; the image's packages are never touched), (2) checks that the
# library and everything the benchmarks import load with the image's
# versions, and prints them, (3) runs accelerator.py, then population.py
# --devices=0, each under a time limit (10 minutes in all by default), their
# tables going to $OUT/*.md and their progress to $OUT/*.log.
#
# Environment: PYTHON (default python3: the image's), OUT (default: a new
# temporary folder), WHEELHOUSE (default benchmarks/wheelhouse), SITE (default
# $TMPDIR/allconv_gpu_site), ALLCONV_GPU_TINY=1 (as --tiny: both benchmarks
# at a smoke-test size; on 2 busy CPU cores about 10 minutes, 4 and 6.5, so
# raise the limits there),
# ACCELERATOR_TIMEOUT / POPULATION_TIMEOUT (seconds; defaults 320 / 200:
# with installing and checking, under the 10 minutes of one device command),
# ACCELERATOR_ARGS / POPULATION_ARGS (more flags for each script).
# Exit status: 0 if everything ran, else that of the first step that failed.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELHOUSE="${WHEELHOUSE:-$REPO/benchmarks/wheelhouse}"
LOCK="$REPO/requirements.lock"
PYTHON="${PYTHON:-python3}"
# What the image lacks of the library's dependencies (pure-Python wheels).
MISSING_IN_IMAGE=(clu ml-collections)

locked() {  # NAME -> NAME==VERSION as requirements.lock pins it.
  local name="$1" pattern
  pattern="^$(echo "$name" | sed 's/[-_.]/[-_.]/g')=="
  grep -i -m1 -E "$pattern" "$LOCK" | sed 's/ *;.*//' || {
    echo "gpu_run.sh: $name is not in $LOCK" >&2; return 1; }
}

build_wheelhouse() {
  local specs=() name spec
  for name in "${MISSING_IN_IMAGE[@]}"; do
    spec="$(locked "$name")" || return 1
    specs+=("$spec")
  done
  specs+=("$@")
  mkdir -p "$WHEELHOUSE"
  rm -f "$WHEELHOUSE"/*.whl  # One version of each: the lock's of today.
  "${BUILD_PYTHON:-python3}" -m pip download --quiet --no-deps \
      --only-binary=:all: --implementation cp \
      --python-version "${WHEEL_PYTHON_VERSION:-3.12}" \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any \
      -d "$WHEELHOUSE" "${specs[@]}" || return 1
  echo "wheelhouse $WHEELHOUSE ($(du -sh "$WHEELHOUSE" | cut -f1)):"
  ls -1 "$WHEELHOUSE"
}

TINY="${ALLCONV_GPU_TINY:-0}"
case "${1:-}" in
  --build-wheelhouse) shift; build_wheelhouse "$@"; exit ;;
  --tiny) TINY=1; shift ;;
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "gpu_run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac

OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/allconv_gpu_run.XXXXXX")}"
SITE="${SITE:-${TMPDIR:-/tmp}/allconv_gpu_site}"
mkdir -p "$OUT" "$SITE"
cd "$REPO" || exit 1
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
echo "gpu_run.sh: outputs in $OUT; $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON")"

# 1. Install, from the wheelhouse alone, the packages this Python lacks.
install_missing() {
  local wheel dist names=()
  shopt -s nullglob
  local wheels=("$WHEELHOUSE"/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "[install] no wheels in $WHEELHOUSE (made by gpu_run.sh" \
         "--build-wheelhouse where pip reaches the registry; carry it here)"
  fi
  for wheel in "${wheels[@]}"; do
    dist="$(basename "$wheel" | cut -d- -f1)"  # The wheel's name, normalized.
    if ! "$PYTHON" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" \
        "$dist" 2>/dev/null; then
      names+=("$dist")
    fi
  done
  if [ ${#names[@]} -eq 0 ]; then
    echo "[install] nothing missing (wheelhouse: $WHEELHOUSE)"
    return 0
  fi
  echo "[install] ${names[*]} from $WHEELHOUSE into $SITE"
  "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELHOUSE" \
      --no-deps --no-compile --upgrade --target "$SITE" "${names[@]}"
}

# 2. The library and what the benchmarks import, with this Python's versions.
check_imports() {
  "$PYTHON" - <<'EOF'
import importlib, importlib.metadata as md, sys
missing = []
for module in ['jax', 'flax', 'optax', 'orbax.checkpoint', 'clu.metrics',
               'ml_collections', 'matplotlib', 'PIL', 'absl', 'etils', 'yaml',
               'tqdm', 'tensorboard.summary.writer.record_writer',
               'tensorboard.compat.proto.event_pb2']:
  try:
    importlib.import_module(module)
  except Exception as e:  # pylint: disable=broad-except
    missing.append(f'{module} ({type(e).__name__}: {e})')
if missing:
  sys.exit('cannot import: ' + '; '.join(missing) + '\nadd the missing '
           'packages to the wheelhouse: benchmarks/gpu_run.sh '
           '--build-wheelhouse NAME==VERSION ...')
import allconv_jax  # Its XLA flags, before JAX starts.
from allconv_jax import (config, datasets, population, reporting, sharding,
                         steps, train, trained)
import jax
versions = []
for dist in ['jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'clu',
             'ml-collections', 'numpy', 'scipy', 'matplotlib', 'tensorboard',
             'protobuf', 'torch']:
  try:
    versions.append(f'{dist} {md.version(dist)}')
  except md.PackageNotFoundError:
    versions.append(f'{dist} -')
print('python', sys.version.split()[0] + ';', ', '.join(versions))
heavy = sorted({m.split('.')[0] for m in sys.modules} &
               {'tensorflow', 'tensorflow_datasets', 'sklearn'})
print('backend', jax.default_backend() + ';', 'devices', jax.devices(),
      '; imported TensorFlow/tfds/scikit-learn:', heavy or 'none')
EOF
}

# 3. One benchmark under a time limit: tables to $OUT/NAME.md, the rest to
# $OUT/NAME.log.
run_benchmark() {
  local name="$1" limit="$2" status start
  shift 2
  echo "[$name] $* (limit ${limit} s) ..."
  start=$SECONDS
  timeout --kill-after=15 "$limit" "$PYTHON" "benchmarks/$name.py" "$@" \
      >"$OUT/$name.md" 2>"$OUT/$name.log"
  status=$?
  if [ $status -eq 0 ]; then
    echo "[$name] done in $((SECONDS - start)) s: $OUT/$name.md"
  else
    if [ $status -eq 124 ] || [ $status -eq 137 ]; then
      echo "[$name] stopped at its limit of ${limit} s (SIGTERM, SIGKILL 15 s later)"
    fi
    echo "[$name] FAILED (status $status) after $((SECONDS - start)) s; the" \
         "end of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log"
  fi
  return $status
}

{
  install_missing || { echo "[install] FAILED"; exit 3; }
  check_imports || { echo "[check] FAILED"; exit 4; }
} 2>&1 | tee "$OUT/versions.txt"
status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] || exit "$status"

if [ "$TINY" = 1 ]; then
  accelerator=(--width=0.125 --train_size=256 --test_size=100 --batch_size=32
               --steps=3 --epochs=2 --preprocess=standardize --notorch_compile)
  population=(--quick)
else
  accelerator=()
  population=()
fi
# shellcheck disable=SC2206  # Word splitting of the extra flags is wanted.
accelerator+=(${ACCELERATOR_ARGS:-})
# shellcheck disable=SC2206
population+=(--devices=0 ${POPULATION_ARGS:-})

begin=$SECONDS
first_failure=0
run_benchmark accelerator "${ACCELERATOR_TIMEOUT:-320}" "${accelerator[@]}" ||
  first_failure=$?
run_benchmark population "${POPULATION_TIMEOUT:-200}" "${population[@]}" ||
  { s=$?; [ $first_failure -ne 0 ] || first_failure=$s; }
echo "gpu_run.sh: $((SECONDS - begin)) s for the benchmarks; outputs in $OUT:"
ls -l "$OUT"
exit $first_failure
