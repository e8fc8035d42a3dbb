# Sourced by gpu_check.sh and multi_gpu_check.sh: run_step NAME COMMAND... runs the command,
# appends its output to $OUT/NAME.log, and records "NAME: ok/FAILED (seconds)" in the array
# `summary`, counting failures in `failed`.
failed=0
summary=()

run_step() {
    local name=$1; shift
    local start=$SECONDS
    echo "=== $name: $*" | tee -a "$OUT/$name.log"
    if "$@" 2>&1 | tee -a "$OUT/$name.log"; then
        summary+=("$name: ok ($((SECONDS - start)) s)")
    else
        summary+=("$name: FAILED ($((SECONDS - start)) s, see $name.log)")
        failed=$((failed + 1))
    fi
}
