#!/usr/bin/env bash
# Issue 17's GPU measurements in one call (about 8 minutes on an H200), for a session lent a GPU machine:
#   1. benchmarks/device_check.py with torch.compile on (the CUDA kernels the benchmarks time are checked first);
#   2. step_time.py, bf16 autocast, default noise: GPT-2 small at seq 1024 (the issue's target setting) and the
#      CPU tables' GPT-2 6x384 / BERT 4x256; plain, ste, ste_detach, full; then aihwkit-lightning's Triton path
#      against plain and ste on GPT-2 small in a run of its own;
#   3. step_time.py on the `pcm` and `rram` presets (plain, ste, ste_hw), GPT-2 small at seq 1024;
#   4. kernel_profile.py: plain vs ste kernels per step on GPT-2 small (launch-bound or not).
# Each stage has its own time limit, and a stage that fails or runs out leaves the others running.
#
#   bash benchmarks/gpu_session.sh [OUTDIR]                      # on the GPU machine (OUTDIR default: $OUT)
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_session.sh /tmp/dry   # dry run on the CPU: small models, one round
#   STAGES="default presets" MODELS=gpt2_124m_1024 bash benchmarks/gpu_session.sh   # a rerun of some stages only
#   (stages: check default peer presets profile; PRESETS="pcm" narrows the presets; PEER_TRITON=0 runs the
#   peer's PyTorch path instead of its Triton kernel)
#
# aihwkit-lightning is not in the GPU image: its wheel (pure Python) travels in .whl/ (see benchmarks/README.md);
# without it the peer row is left out with a note. Output: OUTDIR/tables.md (the tables), OUTDIR/session.log
# (everything), OUTDIR/json.tar.gz (every run's JSON): three files, within the device tool's eight.
set -u
out=${1:-${OUT:-gpu_session_out}}
dev=${DEVICE:-cuda}
mkdir -p "$out/json"
tables="$out/tables.md"
log="$out/session.log"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/hf_cim_site .whl/*.whl >>"$log" 2>&1 &&
        export PYTHONPATH="$PYTHONPATH:/tmp/hf_cim_site"
fi
if [ -n "${QUICK:-}" ]; then
    size=(--quick --rounds 1 --steps 1 --warmup 1)
    big=gpt2
    models=gpt2,bert
    profile_steps=(--quick --steps 1 --warmup 1)
else
    size=(--rounds 5 --steps 5 --warmup 2)
    big=gpt2_124m_1024
    models=gpt2_124m_1024,gpt2,bert
    profile_steps=(--steps 3 --warmup 3)
fi
models=${MODELS:-$models}
stages=" ${STAGES:-check default peer presets profile} "
amp=(--amp bf16)
[ "$dev" = cpu ] && amp=()  # bf16 autocast is a GPU setting; the dry run checks the plumbing only

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log everything, note the exit status in both files
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $* (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$log"
    local start=$SECONDS
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    echo "=== $name: rc $rc after $((SECONDS - start))s" | tee -a "$log" "$tables"
}

section() {  # section NAME HEADING: copy stage NAME's printed report (from its HEADING line on) into the tables
    awk -v p="=== $1:" 'index($0, p) == 1 && /limit/ {on=1; next} on && /^=== / {on=0} on' "$log" |
        sed -n "/^$2/,\$p" >>"$tables"
}

{
    echo "# hf_cim GPU session, $(date -u +%Y-%m-%dT%H:%MZ), checkout $(git rev-parse --short HEAD 2>/dev/null)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)"
} >>"$tables" 2>&1

if [[ $stages == *" check "* ]]; then
    HF_CIM_COMPILE=1 stage device_check 90 python3 benchmarks/device_check.py --device "$dev"
    grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$log" | tail -12 >>"$tables"
fi

if [[ $stages == *" default "* ]]; then
    stage step_time_default 160 python3 benchmarks/step_time.py --device "$dev" "${amp[@]}" --models "$models" \
        --variants plain,ste,ste_detach,full --widths '' "${size[@]}" --out "$out/json/default.json"
    section step_time_default "# Step time"
fi

# The peer in its own process (its Triton autotuning may be slow; a limit hit here leaves the table above whole),
# with plain and ste again so that its ratios are paired within its own run.
if [[ $stages == *" peer "* ]]; then  # aihwkit-lightning takes any non-empty AIHWKIT_USE_TRITON as "on"
    (
        [ "${PEER_TRITON:-1}" = 1 ] && export AIHWKIT_USE_TRITON=1
        stage step_time_peer 120 python3 benchmarks/step_time.py --device "$dev" "${amp[@]}" --models "$big" \
            --variants plain,ste,aihwkit_lightning --widths '' "${size[@]}" --out "$out/json/peer.json"
    )
    section step_time_peer "# Step time"
fi

if [[ $stages == *" presets "* ]]; then
    for preset in ${PRESETS:-pcm rram}; do
        stage "step_time_$preset" 70 python3 benchmarks/step_time.py --device "$dev" "${amp[@]}" --preset "$preset" \
            --models "$big" --variants plain,ste,ste_hw --widths '' "${size[@]}" --out "$out/json/$preset.json"
        section "step_time_$preset" "# Step time"
    done
fi

if [[ $stages == *" profile "* ]]; then
    stage kernel_profile 50 python3 benchmarks/kernel_profile.py --device "$dev" "${amp[@]}" --model "$big" \
        --variants plain,ste "${profile_steps[@]}" --out "$out/json/profile.json"
    section kernel_profile "# Kernel profile"
fi

tar -czf "$out/json.tar.gz" -C "$out" json && rm -rf "$out/json"
echo "done: $tables"
