#!/usr/bin/env bash
# One GPU session through the device tool, whose calls each carry at most 64 MiB and bring back
# at most 8 files: gpu_node.sh runs in the background, in a process session of its own that
# outlives each call, while the later calls bring the rest of the kit's parts. Every call moves
# the parts it carried (under gpu_kit/) into the node's kit, and returns all written so far as
# OUT/gpu_node.tar.gz, the newest notes on its terminal:
#
#   bash benchmarks/gpu_session.sh OUT start tests table pipeline   # the first call
#   bash benchmarks/gpu_session.sh OUT                              # each later call
#   bash benchmarks/gpu_session.sh OUT wait SECONDS                 # the last: until gpu_node.sh ends
#
# `start` returns once the node's package list is written (OUT: out/node.txt, for `make gpu-kit
# PIPELINE=1 NODE_HAS=`). gpu_node.sh runs on a copy of the project (later calls rewrite the tree)
# and waits up to WAIT_S seconds (default 600) for the parts each mode needs. GPU_KIT (default
# gpu_kit) is the folder the calls carry; GPU_NODE_DIR (default /tmp/gpu_node) holds the kit,
# the copy and the outputs. Exits 0; `wait`, gpu_node.sh's status, or 124 while it still runs.
set -uo pipefail
usage="usage: $0 OUT [start tests|table|pipeline...|wait SECONDS]"
[[ $# -ge 1 ]] || { echo "$usage" >&2; exit 2; }
out=$(realpath -m "$1") work=$(realpath -m "${GPU_NODE_DIR:-/tmp/gpu_node}"); shift
cd "$(dirname "$0")/.." || exit 2
carried=$(realpath -m "${GPU_KIT:-gpu_kit}")  # by default the repository's gpu_kit/, as `run` carries it
kit=$work/kit results=$work/out
# What gpu_node.sh's modes read: the project less its data, caches and environments.
PROJECT=(benchmarks infra pipeline tests vae .dvc/config .dvcignore .gitignore dvc.yaml params.yaml pyproject.toml
         uv.lock README.md)

# Each part carried, into the kit at the same path, renamed into place whole: gpu_node.sh never
# reads half a part. One already there (an earlier call's) stays.
take_parts() {
    local file dest
    [[ -d $carried ]] || return 0
    while IFS= read -r -d '' file; do
        dest=$kit/${file#"$carried"/}
        [[ -e $dest ]] && continue
        mkdir -p "$(dirname "$dest")"
        { cp "$file" "$dest.partial" && mv "$dest.partial" "$dest"; } || return 2
    done < <(find "$carried" -type f -print0)
}

start() {
    if [[ -e $work/started && ! -e $work/exit ]]; then echo "gpu_session: gpu_node.sh already runs here" >&2; return 2; fi
    rm -rf "$work/project" "$results" "$work/exit"
    mkdir -p "$work/project" "$results"
    cp -r --parents "${PROJECT[@]}" "$work/project/" || return 2
    # setsid: a process session of its own, which the device tool leaves running after the call.
    (cd "$work/project" && WAIT_S=${WAIT_S:-600} GPU_NODE_DIR=$work exec setsid bash -c \
        'bash benchmarks/gpu_node.sh "$@"; echo $? >"$GPU_NODE_DIR/exit"' gpu_node "$kit" "$results" "$@" \
        >"$work/gpu_node.log" 2>&1 </dev/null &)
    touch "$work/started"
    local until=$((SECONDS + 120))  # the wheels, MNIST, then the package list: seconds
    while [[ ! -s $results/node.txt && ! -e $work/exit ]] && ((SECONDS < until)); do sleep 1; done
}

finish() {  # wait SECONDS: until gpu_node.sh has ended, or SECONDS have passed; its status, or 124
    local until=$((SECONDS + $1))
    while [[ ! -e $work/exit ]] && ((SECONDS < until)); do sleep 2; done
    [[ -e $work/exit ]] || return 124
    grep -h '^|' "$results/gpu_check.txt" 2>/dev/null  # the table, if it ran
    return "$(cat "$work/exit")"
}

bundle() {  # everything so far as one file (OUT takes at most 8), and the newest notes
    mkdir -p "$out"
    tar -czf "$out/gpu_node.tar.gz" -C "$work" out gpu_node.log
    tail -n 12 "$results/gpu_node.txt"
}

mkdir -p "$kit"
take_parts || { echo "gpu_session: copying the parts from $carried into $kit failed" >&2; exit 2; }
status=0
case ${1:-} in
    start) shift; start "$@" || exit 2 ;;
    wait) [[ ${2:-} =~ ^[0-9]+$ ]] || { echo "$usage" >&2; exit 2; }
        [[ -e $work/started ]] && { finish "$2"; status=$?; } ;;
    "") ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
if [[ ! -e $work/started ]]; then
    echo "gpu_session: nothing started on this machine (a fresh one?): call with start first" >&2
    exit 2
fi
bundle
exit "$status"
