#!/usr/bin/env bash
# Checks lutflash on a machine with two (or more) GPUs, writing logs and JSON under $OUT
# (default ./multi_gpu_out). Usage:
#   scripts/multi_gpu_check.sh [steps...]    steps: build test-cuda1 ddp (default: all, in order)
#
# build       pip install --no-build-isolation -e . for the GPU in hand (LUTFLASH_CUDA_ARCHS from
#             cuda:0's compute capability, unless set).
# test-cuda1  the GPU test suite (pytest -m cuda) with LUTFLASH_TEST_DEVICE=cuda:1 while cuda:0 is
#             current: the tests' `cuda_device` fixture (tests/conftest.py) hands them cuda:1 and
#             checks that cuda:0 is still current around each test, so the ops must make the
#             tensors' device current and enqueue on that device's current stream. GPU tests
#             must take their device from that fixture; files that hard-code "cuda" are listed
#             in the log, since they run on cuda:0 and prove nothing about cuda:1.
# ddp         examples/train_ddp.py (tiny Llama, lutflash attention, 3-bit LutLinear + LoRA):
#             torchrun --nproc_per_node=2 with NCCL and DistributedDataParallel (per-rank batch
#             B/2, one GPU each) against one process on one GPU with batch B, the same steps and
#             data; scripts/compare_runs.py checks the losses and the last gradients (with
#             tolerances for the model's dtype: bfloat16 on the GPU, where lutflash attention
#             takes 16-bit inputs; the LoRA adapters and their all-reduce stay float32). A second
#             single-GPU run, compared with the first, shows the run-to-run noise for scale.
#             TRAIN_ARGS adds arguments to both runs (e.g. "--steps 8 --batch 8").
#
# NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
# NVSHMEM_DISABLE_NVLS=1. Every step runs even if an earlier one failed; the exit code is the
# number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/multi_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
read -r -a train_args <<< "${TRAIN_ARGS:-}"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test-cuda1 ddp)
source scripts/run_step.sh  # after the cd above

gpus=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
gpu_names=$($PY -c "import torch; print(', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))" 2>/dev/null)
{
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
    nvidia-smi topo -m
} > "$OUT/gpus.txt" 2>&1
if [ "$gpus" -lt 2 ]; then
    echo "multi_gpu_check: needs 2 GPUs, torch sees $gpus (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})" \
        | tee "$OUT/summary.txt"
    exit 1
fi

for step in "${steps[@]}"; do
    case $step in
    build)
        if [ -z "${LUTFLASH_CUDA_ARCHS:-}" ]; then
            LUTFLASH_CUDA_ARCHS=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability(0))")
            export LUTFLASH_CUDA_ARCHS
        fi
        # compat mode builds the extension in place (see scripts/gpu_check.sh)
        run_step build $PY -m pip install --no-build-isolation -q -e . \
            --config-settings editable_mode=compat ;;
    test-cuda1)
        hardcoded=$(grep -lE 'DEVICE *= *"cuda"|device *= *"cuda"|\.cuda\(\)' tests/test_*.py | tr '\n' ' ')
        [ -n "$hardcoded" ] && echo "note: these files put tensors on the current device (cuda:0), not on" \
            "\$LUTFLASH_TEST_DEVICE: $hardcoded" | tee -a "$OUT/test-cuda1.log"
        run_step test-cuda1 env LUTFLASH_TEST_DEVICE=cuda:1 $PY -m pytest -q -m cuda -p no:cacheprovider \
            --junitxml="$OUT/test-cuda1.xml" tests ;;
    ddp)
        run_step ddp-single $PY examples/train_ddp.py --device cuda "${train_args[@]}" \
            --json "$OUT/train_single_gpu.json"
        run_step ddp-nccl env NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,ENV $PY -m torch.distributed.run \
            --standalone --nproc_per_node=2 examples/train_ddp.py --backend nccl --device cuda \
            "${train_args[@]}" --json "$OUT/train_ddp_nccl.json"
        run_step ddp-compare $PY scripts/compare_runs.py "$OUT/train_single_gpu.json" \
            "$OUT/train_ddp_nccl.json"
        # the run-to-run noise of one GPU, for scale (the attention backward may use atomics)
        run_step ddp-repeat $PY examples/train_ddp.py --device cuda "${train_args[@]}" \
            --json "$OUT/train_single_gpu_repeat.json"
        run_step ddp-noise $PY scripts/compare_runs.py "$OUT/train_single_gpu.json" \
            "$OUT/train_single_gpu_repeat.json" ;;
    *)
        echo "unknown step: $step"; failed=$((failed + 1)) ;;
    esac
done

echo
echo "=== summary ($gpus GPUs: $gpu_names; commit $(git rev-parse --short HEAD 2>/dev/null))"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
exit $failed
