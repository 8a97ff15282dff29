#!/usr/bin/env bash
# Single-node serving launch: torchrun (standalone rendezvous) of megatron_bdlora.serve, one rank per TP shard.
#
#   launch/serve.sh [--tp N] [--config C.yaml] [serve flags ...]
#
#   --tp N       ranks = tensor-parallel degree (not passed on); default: `tp` in the --config YAML, else 1
#   serve flags  passed through to megatron_bdlora.serve (see python -m megatron_bdlora.serve --help), e.g.
#                --megatron-dir MEG --mode block_diagonal --adapter NAME=DIR --max-loras 4 --port 8000
#
# Environment:
#   PYTHON               interpreter to use (default: the repo's .venv/bin/python, else python3)
#   BDLORA_SERVE_MODULE  python module torchrun runs (default megatron_bdlora.serve)
#   MEGATRON_BDLORA_API_KEY  API key required on /v1/* (set it whenever --host is not 127.0.0.1)
#
# launch/slurm/serve.sbatch sources this file for its functions; main runs only when executed.

# shellcheck source=launch/train.sh
source "$(dirname "${BASH_SOURCE[0]}")/train.sh"  # bdlora_python

# Split serve arguments: --tp N / --tp=N into BDLORA_TP (empty if absent), everything else into the array
# BDLORA_SERVE_ARGS, and the --config path (if any) into BDLORA_SERVE_CONFIG.
bdlora_split_serve_args() {
    BDLORA_TP="" BDLORA_SERVE_CONFIG=""
    BDLORA_SERVE_ARGS=()
    while [[ $# -gt 0 ]]; do
        case $1 in
            --tp)
                [[ $# -ge 2 ]] || { echo "error: --tp needs a value" >&2; return 2; }
                BDLORA_TP=$2
                shift 2
                ;;
            --tp=*) BDLORA_TP=${1#--tp=}; shift ;;
            --config)
                [[ $# -ge 2 ]] && BDLORA_SERVE_CONFIG=$2
                BDLORA_SERVE_ARGS+=("${@:1:2}")
                shift $(($# >= 2 ? 2 : 1))
                ;;
            --config=*) BDLORA_SERVE_CONFIG=${1#--config=}; BDLORA_SERVE_ARGS+=("$1"); shift ;;
            *) BDLORA_SERVE_ARGS+=("$1"); shift ;;
        esac
    done
}

# TP degree after bdlora_split_serve_args: --tp, else `tp` in the --config YAML, else DEFAULT (1).
bdlora_serve_tp() {
    local py=$1 default=${2:-1} tp=$BDLORA_TP
    if [[ -z $tp && -n $BDLORA_SERVE_CONFIG ]]; then
        [[ -f $BDLORA_SERVE_CONFIG ]] || { echo "error: config file $BDLORA_SERVE_CONFIG does not exist" >&2; return 2; }
        tp=$("$py" - "$BDLORA_SERVE_CONFIG" <<'PYEOF'
import sys

import yaml

try:
    with open(sys.argv[1]) as f:
        raw = yaml.safe_load(f) or {}
except yaml.YAMLError as err:
    sys.exit(f"error: {sys.argv[1]} is not valid YAML: {err}")
tp = raw.get("tp") if isinstance(raw, dict) else None
print("" if tp is None else tp)
PYEOF
        ) || return 2
    fi
    tp=${tp:-$default}
    [[ $tp =~ ^[1-9][0-9]*$ ]] || { echo "error: --tp / tp must be a positive integer, got '$tp'" >&2; return 2; }
    echo "$tp"
}

main() {
    if [[ ${1:-} == -h || ${1:-} == --help ]]; then
        sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        return 0
    fi
    local repo py tp module
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    py=$(bdlora_python "$repo")
    bdlora_split_serve_args "$@" || return
    tp=$(bdlora_serve_tp "$py" 1) || return
    module=${BDLORA_SERVE_MODULE:-megatron_bdlora.serve}
    local cmd=("$py" -m torch.distributed.run --standalone --nproc_per_node "$tp" -m "$module" "${BDLORA_SERVE_ARGS[@]}")
    echo "+ ${cmd[*]}" >&2
    exec "${cmd[@]}"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    main "$@"
fi
