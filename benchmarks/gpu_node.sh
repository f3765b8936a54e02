#!/usr/bin/env bash
# The GPU table and the GPU tests on a bare GPU node: Python with its own CUDA torch, onnx,
# onnxruntime and pytest, no package index. KIT holds what `make gpu-kit` made, copied in:
# first/, the ort-N/ parts for the CUDA decode rows, the whl-N/ parts for the pipeline. OUT
# gets every output:
#
#   bash benchmarks/gpu_node.sh KIT OUT tests          # pytest -m gpu: training, its draws, evaluation
#   bash benchmarks/gpu_node.sh KIT OUT table          # benchmarks/gpu_check.py's whole table
#   CHECK_ARGS="--only decoding" bash benchmarks/gpu_node.sh KIT OUT table   # one section again
#   bash benchmarks/gpu_node.sh KIT OUT pipeline       # gpu_pipeline.py, the Ray and serving GPU tests
#
# What the node lacks goes into $GPU_NODE_DIR (default /tmp/gpu_node): pydantic and
# onnxruntime-gpu into site/, put first on PYTHONPATH, and for the pipeline a venv over the
# node's Python (infra/node_install.py); the node's own environment is left as it is. Parts
# are checked one by one against the listing in their first folder (ort-1/, whl-1/) before they
# are joined. A mode waits up to WAIT_S seconds (default 0) for the parts it needs, which later
# copies bring (benchmarks/gpu_session.sh); while some of onnxruntime-gpu's are missing, the
# table decodes on the node's CPU onnxruntime alone. PY (default python3) is the Python with the
# node's torch; ZSTD (default zstd) the zstd program, whose work that Python's pyarrow does where
# it is missing; CHECK_S, TEST_S and PIPELINE_S (s) cap the runs, CHECK_ARGS and PIPELINE_ARGS add
# to them. Exits with the worst status.
set -uo pipefail
usage="usage: $0 KIT OUT tests|table|pipeline..."
[[ $# -ge 3 && -d ${1:-} ]] || { echo "$usage (KIT: the folder with first/ in it)" >&2; exit 2; }
kit=$(realpath "$1") out=$(realpath -m "$2"); shift 2
cd "$(dirname "$0")/.." || exit 2
PY=${PY:-python3} ZSTD=${ZSTD:-zstd} work=${GPU_NODE_DIR:-/tmp/gpu_node}
site=$work/site data=$work/mnist
mkdir -p "$out" "$site"
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
worst=0

note() { echo "gpu_node: [${SECONDS} s] $*" | tee -a "$out/gpu_node.txt"; }  # seconds since the start

# A wheel unpacked is what `pip install --target` leaves of one without scripts, as these are;
# the node's Python may lack pip.
install_wheels() {
    [[ -e $site/.wheels ]] && return
    "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
        "$site" "$kit"/first/wheels/*.whl && touch "$site/.wheels"
}

# unpack NAME DEST: the parts that NAME.parts (in the payload's first folder) lists, wherever
# they are under KIT, each checked against its sha256, joined and unpacked into DEST once. Parts
# not here yet are waited for up to WAIT_S seconds (default 0): later copies bring them. 0: done;
# 1: not all here, or no zstd decoder (named); 2: a part that does not match (named), or unpacking failed.
unpack() {
    local name=$1 dest=$2 until=$((SECONDS + ${WAIT_S:-0})) waited= listing sum part path i paths sums missing
    [[ -e $dest/.$name ]] && return 0
    while :; do
        listing=$(find "$kit" -name "$name.parts" -print -quit) paths=() sums=() missing=()
        [[ -n $listing ]] || missing=("$name.parts")
        while [[ -n $listing ]] && read -r sum part; do
            path=$(find "$kit" -name "$part" -print -quit)
            if [[ -n $path ]]; then paths+=("$path") sums+=("$sum"); else missing+=("$part"); fi
        done <"${listing:-/dev/null}"
        ((${#missing[@]})) || break
        if ((SECONDS >= until)); then note "$name not unpacked, missing from $kit: ${missing[*]}"; return 1; fi
        [[ -n $waited ]] || note "$name: waiting up to $((until - SECONDS)) s for ${missing[*]}"
        waited=1
        sleep 2
    done
    for i in "${!paths[@]}"; do  # hashed once all are here, not at every look while waiting
        if [[ $(sha256sum <"${paths[i]}" | cut -d' ' -f1) != "${sums[i]}" ]]; then
            note "${paths[i]}: sha256 does not match $listing (a damaged copy)"
            return 2
        fi
    done
    command -v "$ZSTD" >/dev/null || "$PY" -c "import pyarrow" 2>/dev/null \
        || { note "$name not unpacked: this node has neither zstd nor pyarrow"; return 1; }
    mkdir -p "$dest"
    cat "${paths[@]}" | unzstd | tar -xf - -C "$dest" || { note "unpacking $name failed"; return 2; }
    touch "$dest/.$name"
    note "$name unpacked into $dest"
}

# zstd's decoding, standard input to output: the zstd program, or else the node Python's pyarrow
# (the GPU image lists pyarrow, not zstd). Both take --long=27's window by default.
unzstd() {
    if command -v "$ZSTD" >/dev/null; then "$ZSTD" -d -q --long=27; return; fi
    "$PY" -c "import sys, pyarrow as pa
with pa.CompressedInputStream(pa.PythonFile(sys.stdin.buffer, mode='r'), 'zstd') as source:
    while chunk := source.read(1 << 20):
        sys.stdout.buffer.write(chunk)"
}

# onnxruntime-gpu into the site, for the table's CUDA rows and the pipeline's server: without it
# they run on the node's CPU build; a damaged part stops the script.
onnxruntime_gpu() {
    unpack onnxruntime-gpu "$site"
    (($? == 2)) && exit 2
    return 0
}

prepare() {
    install_wheels || { note "installing $kit/first/wheels failed"; exit 2; }
    "$PY" -c "import sys; from pathlib import Path; from pipeline.fetch import fetch; fetch(sys.argv[1], Path(sys.argv[2]), 5)" \
        "$kit/first/mnist" "$data" || { note "MNIST from $kit/first/mnist failed"; exit 2; }
    # The node's packages and the site's, as pip list --format=freeze writes them (the node may lack pip).
    "$PY" -c "import importlib.metadata as m; print(*sorted({f'{d.name}=={d.version}' for d in m.distributions()}), sep='\n')" \
        >"$out/node.txt"
    nvidia-smi >"$out/gpu.txt" 2>&1 || echo "no nvidia-smi" >"$out/gpu.txt"
}

run() {  # run NAME SECONDS COMMAND...: its output to OUT/NAME.txt, as it comes
    local name=$1 seconds=$2 status
    shift 2
    note "$name: $* (at most ${seconds} s)"
    timeout "$seconds" "$@" 2>&1 | tee "$out/$name.txt"
    status=${PIPESTATUS[0]}
    note "$name: exit $status"
    ((status > worst)) && worst=$status
}

# The project's venv over the node's Python, from the wheelhouse's parts; 1 when not all here.
pipeline_venv() {
    local venv=$work/venv
    [[ -e $venv/.installed ]] && return 0
    unpack wheelhouse "$work/wheelhouse" || return
    "$PY" infra/node_install.py "$work/wheelhouse" "$venv" >"$out/node_install.txt" 2>&1 \
        || { note "infra/node_install.py failed: $out/node_install.txt"; return 2; }
    touch "$venv/.installed"
}

prepare
for what in "$@"; do
    case $what in
        tests) VAE_TEST_MNIST=$data run pytest_gpu "${TEST_S:-240}" "$PY" -m pytest -m gpu -p no:cacheprovider \
            tests/test_training.py tests/test_rng.py tests/test_evaluate.py ;;
        table) onnxruntime_gpu
            run gpu_check "${CHECK_S:-420}" "$PY" benchmarks/gpu_check.py --data "$data" ${CHECK_ARGS:-} ;;
        pipeline)
            onnxruntime_gpu
            pipeline_venv
            case $? in 0) ;; 1) worst=2; continue ;; *) exit 2 ;; esac
            run gpu_pipeline "${PIPELINE_S:-540}" "$work/venv/bin/python" benchmarks/gpu_pipeline.py \
                --data "$data" --out "$out/pipeline" ${PIPELINE_ARGS:-}
            # Those needing Ray or the server: a GPU worker, the nodes' GPU shares, the providers served.
            VAE_TEST_MNIST=$data run pytest_pipeline "${TEST_S:-240}" "$work/venv/bin/python" -m pytest \
                -p no:cacheprovider -k "gpu or metadata" tests/test_train_ray.py tests/test_infra.py tests/test_serve.py ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
exit "$worst"
