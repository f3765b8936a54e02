#!/usr/bin/env bash
# The GPU table and the GPU tests on a bare GPU node: Python with its own CUDA torch, onnx,
# onnxruntime and pytest, no package index. KIT holds what `make gpu-kit` made (first/ and,
# for the CUDA decode rows, every ort-N/ part), copied in; OUT gets every output:
#
#   bash benchmarks/gpu_node.sh KIT OUT tests          # pytest -m gpu: training, its draws, evaluation
#   bash benchmarks/gpu_node.sh KIT OUT table          # benchmarks/gpu_check.py's whole table
#   CHECK_ARGS="--only decoding" bash benchmarks/gpu_node.sh KIT OUT table   # one section again
#
# What the node lacks goes into $GPU_NODE_DIR/site (default /tmp/gpu_node), put first on
# PYTHONPATH: the node's own environment is left as it is. onnxruntime-gpu's parts are checked
# one by one against first/onnxruntime-gpu.parts before they are joined; while some are missing,
# the table's decoding runs on the node's CPU onnxruntime alone. PY (default python3) is the
# Python with the node's torch; CHECK_S and TEST_S (s) cap the two runs. Exits with the worst status.
set -uo pipefail
usage="usage: $0 KIT OUT tests|table..."
[[ $# -ge 3 && -d ${1:-} ]] || { echo "$usage (KIT: the folder with first/ in it)" >&2; exit 2; }
kit=$(realpath "$1") out=$(realpath -m "$2"); shift 2
cd "$(dirname "$0")/.." || exit 2
PY=${PY:-python3} work=${GPU_NODE_DIR:-/tmp/gpu_node}
site=$work/site data=$work/mnist
mkdir -p "$out" "$site"
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
worst=0

note() { echo "gpu_node: $*" | tee -a "$out/gpu_node.txt"; }

# A wheel unpacked is what `pip install --target` leaves of one without scripts, as these are;
# the node's Python may lack pip.
install_wheels() {
    [[ -e $site/.wheels ]] && return
    "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
        "$site" "$kit"/first/wheels/*.whl && touch "$site/.wheels"
}

# onnxruntime-gpu into the site once every part is here and matches its sha256: 0 installed,
# 1 parts missing (named), 2 a part that does not match (named).
install_ort() {
    local listing=$kit/first/onnxruntime-gpu.parts sum name path paths=() missing=()
    [[ -e $site/.ort ]] && return 0
    [[ -f $listing ]] || { note "no onnxruntime-gpu in $kit"; return 1; }
    while read -r sum name; do
        path=$(find "$kit" -name "$name" -print -quit)
        if [[ -z $path ]]; then missing+=("$name"); continue; fi
        if [[ $(sha256sum <"$path" | cut -d' ' -f1) != "$sum" ]]; then
            note "$path: sha256 does not match $listing (a damaged copy)"
            return 2
        fi
        paths+=("$path")
    done <"$listing"
    if ((${#missing[@]})); then note "onnxruntime-gpu not installed yet, missing: ${missing[*]}"; return 1; fi
    cat "${paths[@]}" | zstd -d -q --long=27 | tar -xf - -C "$site" || { note "unpacking onnxruntime-gpu failed"; return 2; }
    touch "$site/.ort"
    note "onnxruntime-gpu installed into $site"
}

prepare() {
    install_wheels || { note "installing $kit/first/wheels failed"; exit 2; }
    install_ort
    (($? == 2)) && exit 2
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

prepare
for what in "$@"; do
    case $what in
        tests) VAE_TEST_MNIST=$data run pytest_gpu "${TEST_S:-240}" "$PY" -m pytest -m gpu -p no:cacheprovider \
            tests/test_training.py tests/test_rng.py tests/test_evaluate.py ;;
        table) run gpu_check "${CHECK_S:-420}" "$PY" benchmarks/gpu_check.py --data "$data" ${CHECK_ARGS:-} ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
exit "$worst"
