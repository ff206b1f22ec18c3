#!/usr/bin/env bash
# The prepared GPU check: everything gpu_check.py measures, in one device call of under 10 minutes.
#
#   bash benchmarks/gpu_session.sh "$OUT"        # on the GPU machine, from the repository root
#
# The device machine runs its own python3 (PyTorch, timm and the rest of its image), with no install of
# this project: gpu_check.py puts the repository root on the path itself. Each part has a time limit of
# its own, so that one that hangs or compiles for too long costs only itself; each writes its JSON report
# (rewritten after every finished piece) and its log. Eight files come back, the device tool's most:
# env.txt, status.txt and a .json and a .log for each of eager, ddp and compiled.
set -u
out=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
    date -u
    nvidia-smi
    "$py" -c 'import sys, torch, timm; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda",
torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "timm", timm.__version__)'
} > "$out/env.txt" 2>&1

part() {  # name, time limit in seconds, gpu_check.py arguments
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$py" benchmarks/gpu_check.py "$@" --out "$out/$name.json" > "$out/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s (limit $limit s): $*" >> "$out/status.txt"
}

# (a) parity, (b) and (c) eager: the figures that matter most come first
part eager 200 --parts parity,pretrain,finetune --modes eager
# (d) DDP over NCCL on every visible GPU
part ddp 90 --parts ddp
# (b) compiled: compilation, and any recompilation a new mask causes, can take minutes
part compiled 250 --parts pretrain --modes compiled --warmup 4 --steps 6
cat "$out/status.txt"
