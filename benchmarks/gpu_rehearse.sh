#!/usr/bin/env bash
# The GPU session of docs/GPU.md rehearsed on this machine, on the CPU: every call of
# benchmarks/gpu_session.sh as the device tool makes it (a fresh copy of the tracked tree plus
# the parts it carries, OUT empty), back to back, over a stand-in of the GPU image (a Python 3.12
# venv with that image's torch 2.11, onnx, onnxruntime for the CPU and pytest; no Ray, MLflow,
# DVC or pydantic), built here from PyPI where it is missing. A session's time is spent on the
# node, not on finding that a change here broke the kit, the install or a stage:
#
#   bash benchmarks/gpu_rehearse.sh [WORK]    # WORK default /tmp/gpu_rehearse; about 6 to 8 min
#
# It runs `make gpu-kit`, then call 1 (first/ and the last ort part: start tests table pipeline),
# builds the pipeline's parts from the node's package list while the other ort calls run, and
# carries each whl part; the last waits for the end. The table and the pipeline run small
# (--device cpu --quick; WORK/small.yaml's params). PY312 names the Python 3.12 for the
# stand-in (default python3.12). Exits with the session's status; prints where the node's
# outputs are.
set -uo pipefail
work=$(realpath -m "${1:-/tmp/gpu_rehearse}")
cd "$(dirname "$0")/.." || exit 2
repo=$PWD standin=$work/standin t0=$SECONDS uv=${UV:-.tools/bin/uv}
say() { echo "gpu_rehearse: [$((SECONDS - t0)) s] $*"; }

# The GPU image's kind of set, at its versions where they matter (benchmarks/RESULTS.md).
if [[ ! -x $standin/bin/python ]]; then
    say "the stand-in of the GPU image, into $standin"
    "$uv" venv -q -p "${PY312:-python3.12}" "$standin" && "$uv" pip install -q -p "$standin/bin/python" \
        torch==2.11.0 torchvision==0.26.0 onnx==1.23.2 onnxruntime==1.30.0 onnxscript numpy pytest pyyaml \
        filelock tqdm pillow psutil httpx pyarrow pandas scipy || { say "the stand-in failed"; exit 2; }
fi
cat >"$work/small.yaml" <<'EOF'
data: {max_train_images: 3000}
model: {latent_dim: 8, hidden_dims: [128]}
train: {epochs: 8, num_workers: 1}
eval: {iwae_k: 10, max_test_images: 500}
EOF
export PY=$standin/bin/python GPU_NODE_DIR=$work/node CHECK_ARGS="--device cpu --quick"
export PIPELINE_ARGS="--params $work/small.yaml --seconds 3 --clients 4"
rm -rf "$work/node" "$work/calls" && mkdir -p "$work/calls"
make gpu-kit >"$work/gpu_kit.log" 2>&1 || { say "make gpu-kit failed: $work/gpu_kit.log"; exit 2; }
calls=0

call() {  # call "CARRIED..." [ARGS...]: one device call, carrying gpu_kit/ paths
    local carried=$1 tree out path status started=$SECONDS; shift
    calls=$((calls + 1)) tree=$work/calls/$calls out=$work/calls/$calls/OUT
    mkdir -p "$out" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$tree"
    for path in $carried; do mkdir -p "$tree/$(dirname "$path")" && cp -r "$path" "$tree/$path"; done
    (cd "$tree" && bash benchmarks/gpu_session.sh "$out" "$@") >"$work/calls/$calls.log" 2>&1
    status=$?
    say "call $calls (${carried:-nothing} ${*:+| $*}): exit $status, $((SECONDS - started)) s"
    return $status
}

ort=($(cd gpu_kit && ls -d ort-* | sort -V))
call "gpu_kit/first gpu_kit/${ort[-1]}" start tests table pipeline || exit 2
tar -xzf "$work/calls/1/OUT/gpu_node.tar.gz" -C "$work" out/node.txt || { say "no node.txt back"; exit 2; }
make gpu-kit PIPELINE=1 NODE_HAS="$work/out/node.txt" >"$work/gpu_kit_pipeline.log" 2>&1 &
kit=$!
for part in "${ort[@]::${#ort[@]}-1}"; do call "gpu_kit/$part"; done
# As in the session: calls that carry nothing keep the machine while the wheels are built.
while kill -0 $kit 2>/dev/null; do call "" wait 30; done
wait $kit || { say "make gpu-kit PIPELINE=1 failed: $work/gpu_kit_pipeline.log"; exit 2; }
parts=($(cd gpu_kit && ls -d whl-* | sort -V))
for part in "${parts[@]::${#parts[@]}-1}"; do call "gpu_kit/$part"; done
call "gpu_kit/${parts[-1]}" wait 180
status=$?
while ((status == 124)); do call "" wait 180; status=$?; done
mkdir -p "$work/back" && tar -xzf "$work/calls/$calls/OUT/gpu_node.tar.gz" -C "$work/back"
say "done, exit $status, $calls calls; the node's outputs in $work/back/out ($repo's commit $(git rev-parse --short HEAD))"
exit $status
