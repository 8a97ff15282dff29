#!/usr/bin/env bash
# Single-node training launch: torchrun (standalone rendezvous) of megatron_bdlora.train on N local ranks.
#
#   launch/train.sh CONFIG [N] [key.sub=value ...]
#
#   CONFIG   YAML run config (configs/*.yaml)
#   N        ranks on this node; default parallel.tp x (parallel.dp or 1) from CONFIG and the overrides
#   key=val  config overrides passed through to the trainer, e.g. lora.rank=16 schedule.train_steps=5
#
# Environment:
#   PYTHON               interpreter to use (default: the repo's .venv/bin/python, else python3)
#   BDLORA_TRAIN_MODULE  python module torchrun runs (default megatron_bdlora.train), e.g. a test probe
#
# launch/slurm/train.sbatch sources this file for bdlora_python / bdlora_world_size; main runs only when executed.

# Absolute path of the python interpreter: $PYTHON, else REPO/.venv/bin/python, else python3 from PATH.
bdlora_python() {
    local repo=$1 py
    if [[ -n ${PYTHON:-} ]]; then
        py=$PYTHON
    elif [[ -x $repo/.venv/bin/python ]]; then
        py=$repo/.venv/bin/python
    else
        py=python3
    fi
    command -v "$py" >/dev/null || { echo "error: python interpreter '$py' not found" >&2; return 1; }
    # keep a venv's symlink as is: resolving it would lose the venv's site-packages
    if [[ $py == */* ]]; then echo "$py"; else command -v "$py"; fi
}

# Ranks the config asks for: parallel.tp x (parallel.dp or 1), with parallel.* overrides applied.
bdlora_world_size() {
    local py=$1 config=$2
    shift 2
    "$py" - "$config" "$@" <<'EOF'
import sys

import yaml

path, overrides = sys.argv[1], sys.argv[2:]
with open(path) as f:
    parallel = dict((yaml.safe_load(f) or {}).get("parallel") or {})
for item in overrides:
    key, _, value = item.partition("=")
    if key.strip() in ("parallel.tp", "parallel.dp"):
        parallel[key.strip().split(".")[1]] = yaml.safe_load(value)
tp, dp = parallel.get("tp") or 1, parallel.get("dp") or 1
if not (isinstance(tp, int) and isinstance(dp, int) and tp > 0 and dp > 0):
    sys.exit(f"error: {path}: parallel.tp and parallel.dp must be positive integers, got tp={tp!r} dp={dp!r}")
print(tp * dp)
EOF
}

main() {
    if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
        sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        [[ $# -ge 1 ]] && return 0 || return 2
    fi
    local repo config nproc py module
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    config=$1
    shift
    [[ -f $config ]] || { echo "error: config file $config does not exist" >&2; return 2; }
    py=$(bdlora_python "$repo")
    if [[ $# -ge 1 && $1 =~ ^[0-9]+$ ]]; then
        nproc=$1
        shift
    else
        nproc=$(bdlora_world_size "$py" "$config" "$@")
    fi
    module=${BDLORA_TRAIN_MODULE:-megatron_bdlora.train}
    local cmd=("$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m "$module" --config "$config" "$@")
    echo "+ ${cmd[*]}" >&2
    exec "${cmd[@]}"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    main "$@"
fi
