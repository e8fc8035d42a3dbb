#!/usr/bin/env bash
# Build, test, sanitize and benchmark lutflash on a GPU machine, writing logs and JSON under
# $OUT (default ./gpu_out). Usage:
#   scripts/gpu_check.sh [steps...]     steps: build test sanitize bench-lutgemm bench-attention
#                                       (default: all of them, in that order)
# LUTFLASH_PREBUILT=1: build/cuda-<archs>/ holds the CUDA objects of this tree compiled on
# another machine (LUTFLASH_CUDA_ARCHS=90 python setup.py build_ext there, then the device
# tool's `carry` of build/cuda-90): the build step marks them current and compiles only the C
# files. LUTFLASH_COMMIT names the commit in the summary where the tree has no .git.
# The build targets only the GPU in hand (LUTFLASH_CUDA_ARCHS from its compute capability,
# unless set). Every step runs even if an earlier one failed; the exit code is the number of
# failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# the build puts the extension in python/lutflash (see the build step); a later call on a
# warm machine can skip the build
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test sanitize bench-lutgemm bench-attention)
source scripts/run_step.sh  # after the cd above

for step in "${steps[@]}"; do
    case $step in
    build)
        if [ -z "${LUTFLASH_CUDA_ARCHS:-}" ]; then
            LUTFLASH_CUDA_ARCHS=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
            export LUTFLASH_CUDA_ARCHS
        fi
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
        # compat mode builds the extension in place (python/lutflash/_C*.so), so the package
        # imports from the tree whichever way the machine's pip handles editable installs
        if [ -n "${LUTFLASH_PREBUILT:-}" ]; then
            # carried CUDA objects (setup.py keeps them in build/cuda-<archs>/): copies arrive
            # older than the sources, so mark them current; only the C files compile
            find build -path 'build/cuda-*' -name '*.o' -exec touch {} +
            run_step build $PY setup.py -q build_ext --inplace
        else
            run_step build $PY -m pip install --no-build-isolation -q -e . \
                --config-settings editable_mode=compat
        fi
        run_step import $PY -c "import lutflash; assert lutflash.built_with_cuda, 'built without CUDA'; print('lutflash', lutflash.__version__, 'from', lutflash.__file__)" ;;
    test)
        run_step test $PY -m pytest -q -m cuda -p no:cacheprovider tests ;;
    sanitize)
        for script in scripts/sanitize_*.py; do
            name=sanitize-$(basename "$script" .py | sed 's/^sanitize_//')
            for tool in memcheck racecheck initcheck; do
                run_step "$name-$tool" compute-sanitizer --tool $tool --error-exitcode 1 $PY "$script"
            done
        done ;;
    bench-lutgemm)
        run_step bench-lutgemm $PY benchmarks/bench_lutgemm.py --device cuda \
            --json "$OUT/lutgemm_cuda.json" --plot "$OUT/lutgemm_cuda.png" ;;
    bench-attention)
        run_step bench-attention $PY benchmarks/bench_attention.py --device cuda \
            --json "$OUT/attention_cuda.json" --plot "$OUT/attention_cuda" ;;
    *)
        echo "unknown step: $step"; failed=$((failed + 1)) ;;
    esac
done

echo
echo "=== summary ($(cat "$OUT/gpu.txt" 2>/dev/null), commit ${LUTFLASH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)})"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
exit $failed
