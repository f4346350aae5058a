#!/usr/bin/env bash
# The GPU path in one command, on an offline CUDA machine with a fixed Python environment:
#
#     bash bench/gpu_check.sh OUT                                 # CUDA: under 8 minutes on an H100/H200
#     DIFFTPT_GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh OUT    # rehearsal on a CPU (see below)
#
#   (a) install   pip install --no-index the wheel folder (bench/gpu_wheels.sh DIR, made beforehand where
#                 pip works; default .gpu-wheels), report the environment, and check that the engine and
#                 the benches import without Celery, MLflow or a database driver
#   (b) pytest    python -m pytest -m gpu tests/gpu
#   (c) tta       bench/tta_speed.py --device cuda (TPT and DiffTPT at 200 and 1000 classes, ours vs reference),
#                 then bench/tta_breakdown.py --device cuda (where a sample's time goes) and
#                 bench/worker_speed.py --device cuda (TPT through the shard path, views built ahead or not)
#   (e) cli       the CLI end to end in embedded mode on 8 samples: models make-tiny, data add, submit generate,
#                 submit tune for zeroshot, tpt and difftpt, results
#   (d) generation bench/generation_speed.py --device cuda (full SD 1.x at 512 px, 50 steps, guidance 3: the
#                 reference's way vs ours at batch 8/16/32, torch.compile if time is left)
#
# (d) runs last because it is the longest and bounds itself by the time left. Every step has its own time
# box, and the whole run a deadline (DIFFTPT_GPU_CHECK_BUDGET_S, default 480 s on CUDA), so one failure
# cannot eat the budget. DIFFTPT_GPU_CHECK_STEPS=c-tta,e-cli reruns only the steps named (the install always
# runs); the summary's `partial` lists those left out. OUT receives at most 8 files (what a device run can
# bring back): one log per step, results.jsonl (every JSON line any step printed, tagged with its step) and
# summary.json, whose content is also the last line printed.
#
# CPU rehearsal: builds a virtual environment holding only the GPU image's packages (bench/gpu_image_sim.py,
# linked from this project's .venv), installs wheels for this Python into it with --no-index exactly as on
# the GPU, and runs every step with tiny sizes on the CPU (the GPU tier with DIFFTPT_OPS_TEST_GPU_DEVICE=cpu).
# It proves the plumbing, not CUDA.
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash bench/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
DEVICE=${DIFFTPT_GPU_CHECK_DEVICE:-cuda}
WORK=${DIFFTPT_GPU_CHECK_WORK:-${TMPDIR:-/tmp}/difftpt-gpu-check}
STARTED=$(date +%s)
if [[ $DEVICE == cpu ]]; then
    BUDGET=${DIFFTPT_GPU_CHECK_BUDGET_S:-3600}
    HOST_PY=${PYTHON:-$REPO/.venv/bin/python}  # the environment the simulated image is linked from
else
    BUDGET=${DIFFTPT_GPU_CHECK_BUDGET_S:-480}
    HOST_PY=${PYTHON:-python3}
fi
DEADLINE=$((STARTED + BUDGET))
rm -f "$OUT"/*.log "$OUT/results.jsonl" "$OUT/summary.json" "$OUT/b-pytest.xml"
rm -rf "$WORK" && mkdir -p "$WORK"
export OUT REPO DEVICE WORK
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PY=$HOST_PY SITE=$WORK/site
export PYTHONPATH=$SITE:$REPO

# Per-step time boxes (seconds): CUDA, then the CPU rehearsal (2 shared cores, so generous).
# Measured on an H200 (first run): each new Python process there spends about 10 s importing torch, open_clip
# and diffusers, so the install's import test and the CLI's 9 commands need more than their compute.
declare -A CAP_CUDA=([a-install]=90 [b-pytest]=130 [c-tta]=200 [e-cli]=220 [d-generation]=400)
declare -A CAP_CPU=([a-install]=600 [b-pytest]=1200 [c-tta]=600 [e-cli]=600 [d-generation]=600)

step_a_install() {
    set -e
    if [[ $DEVICE == cpu ]]; then
        local version
        version=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        WHEELS=${DIFFTPT_GPU_WHEELS:-$WORK/wheels-$version}
        [[ -d $WHEELS ]] || PIP="$PY -m pip" bash bench/gpu_wheels.sh "$WHEELS" "$version"
        "$PY" bench/gpu_image_sim.py "$WORK/image"
        PY=$WORK/image/bin/python
    fi
    WHEELS=${WHEELS:-${DIFFTPT_GPU_WHEELS:-$REPO/.gpu-wheels}}
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE with $PY"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl
    echo "$PY" > "$WORK/python"  # the interpreter every later step uses
    "$PY" bench/gpu_check_env.py
    "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_light_imports.py
}

step_b_pytest() {
    [[ $DEVICE == cpu ]] && export DIFFTPT_OPS_TEST_GPU_DEVICE=cpu OMP_NUM_THREADS=2
    "$PY" -m pytest -m gpu tests/gpu -p no:cacheprovider -q -s -ra --junitxml="$OUT/b-pytest.xml"
}

step_c_tta() {
    if [[ $DEVICE == cpu ]]; then
        "$PY" -c "from difftpt_ops.models.tiny_clip import make_tiny_clip; make_tiny_clip('$WORK/tiny-clip')" &&
            "$PY" bench/tta_speed.py --model "$WORK/tiny-clip" --quick --samples 1 --threads 1
    else
        "$PY" bench/tta_speed.py --device cuda --samples 3 --threads 8
    fi && if [[ $DEVICE == cpu ]]; then
        "$PY" bench/tta_breakdown.py --model "$WORK/tiny-clip" --classes 200 --samples 1 --threads 1 \
            --view-workers 1,2 --text-groups 4,1 &&
            "$PY" bench/worker_speed.py --model "$WORK/tiny-clip" --samples 4 --threads 1
    else
        "$PY" bench/tta_breakdown.py --device cuda --samples 4 --threads 8 --view-workers 8 --text-groups 1 \
            --text-prefix shared,whole &&
            "$PY" bench/worker_speed.py --device cuda --samples 16 --threads 8
    fi
}

step_e_cli() {
    set -e
    local ws=$WORK/workspace n=8 sizes=(--steps 10 --size 64)
    export DIFFTPT_OPS_WORKSPACE=$ws DIFFTPT_OPS_MLFLOW_TRACKING_URI=none  # MLflow is not in the GPU image
    cli() {  # each command's wall time, process start included, as a JSON line on stderr (into the log)
        local started=$(date +%s.%N) rc=0
        "$PY" -m cli.main "$@" || rc=$?
        echo "{\"cli\": \"seconds\", \"command\": \"$1 $2${method:+ $method}\", \"seconds\": $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $started }")}" >&2
        return $rc
    }
    cli models make-tiny "$ws/models" --json | "$PY" bench/gpu_check_env.py --condense models-make-tiny
    "$PY" -c "from difftpt_ops.data.demo_photos import write_demo_dataset; write_demo_dataset('$ws/photos')"
    cli data add photos --root "$ws/photos" --format imagefolder --json \
        | "$PY" bench/gpu_check_env.py --condense data-add
    cli submit generate --dataset photos --model "$ws/models/sd-image-variations" --revision none \
        --per-sample $n "${sizes[@]}" --limit $n --batch-size $n --device "$DEVICE" --json \
        | "$PY" bench/gpu_check_env.py --condense submit-generate
    for method in zeroshot tpt difftpt; do
        local extra=()
        [[ $method == difftpt ]] && extra=(--set n_generated=$n)
        cli submit tune --dataset photos --method $method --model "$ws/models/clip" --pretrained none \
            --limit $n --device "$DEVICE" "${extra[@]}" --json > "$WORK/submit-$method.json"
        "$PY" bench/gpu_check_env.py --condense "submit-tune-$method" < "$WORK/submit-$method.json"
        cli results "$("$PY" -c "import json; print(json.load(open('$WORK/submit-$method.json'))['run_id'])")" \
            --json | "$PY" bench/gpu_check_env.py --condense "results-$method"
    done
}

step_d_generation() {
    local left=$1
    if [[ $DEVICE == cpu ]]; then
        # The eager backend runs the compile path's code without the C++ compilation a CPU would need.
        "$PY" bench/generation_speed.py --batch-sizes 2,4 --channels-last --steps 4 --reference-images 2 \
            --compile --compile-backend eager --compile-min-s 0 --time-budget-s "$left"
    else
        # Leave 60 s for the configuration running when the budget ends to finish inside the step's box.
        # Channels-last was measured slower on an H200 (2.69 against 3.21 images/s at batch 32): not repeated.
        "$PY" bench/generation_speed.py --device cuda --batch-sizes 8,16,32 --reference-images 4 --no-channels-last \
            --compile --compile-min-s 120 --time-budget-s $((left - 60))
    fi
}
export -f step_a_install step_b_pytest step_c_tta step_e_cli step_d_generation

run_step() {
    local name=$1 function=$2 cap limit left rc started
    # DIFFTPT_GPU_CHECK_STEPS=c-tta,d-generation reruns only those steps (the install always runs).
    if [[ -n ${DIFFTPT_GPU_CHECK_STEPS:-} && $name != a-install && ,$DIFFTPT_GPU_CHECK_STEPS, != *,$name,* ]]; then
        echo "{\"step\": \"$name\", \"skipped\": \"not in DIFFTPT_GPU_CHECK_STEPS\", \"rc\": null}" \
            >> "$WORK/steps.jsonl"
        return
    fi
    if [[ $DEVICE == cpu ]]; then cap=${CAP_CPU[$name]}; else cap=${CAP_CUDA[$name]}; fi
    left=$((DEADLINE - $(date +%s)))
    limit=$((cap < left ? cap : left))
    if ((limit < 15)); then
        echo "{\"step\": \"$name\", \"skipped\": \"deadline\", \"rc\": null}" >> "$WORK/steps.jsonl"
        return
    fi
    [[ -f $WORK/python ]] && PY=$(cat "$WORK/python")
    export PY
    echo "== $name (time box ${limit} s)" >&2
    started=$(date +%s.%N)
    timeout -k 10 "$limit" bash -c "$function $limit" > "$OUT/$name.log" 2>&1
    rc=$?
    "$HOST_PY" - "$name" "$rc" "$started" "$limit" "$OUT/$name.log" >> "$WORK/steps.jsonl" <<'EOF'
import json, sys, time
name, rc, started, limit, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
print(json.dumps({"step": name, "rc": rc, "seconds": round(time.time() - started, 1), "limit_s": limit,
                  "timed_out": rc in (124, 137)}))
with open(log, errors="replace") as lines, open(sys.argv[5].rsplit("/", 1)[0] + "/results.jsonl", "a") as out:
    for line in lines:
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            out.write(json.dumps({"step": name, **record}) if isinstance(record, dict) else line)
            out.write("\n")
EOF
    tail -n 3 "$OUT/$name.log" >&2
}

run_step a-install step_a_install
run_step b-pytest step_b_pytest
run_step c-tta step_c_tta
run_step e-cli step_e_cli
run_step d-generation step_d_generation

"$HOST_PY" bench/gpu_check_env.py --summary "$WORK/steps.jsonl" "$OUT/results.jsonl" "$DEVICE" "$STARTED" \
    > "$OUT/summary.json"
cat "$OUT/summary.json"
