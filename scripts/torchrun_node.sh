#!/usr/bin/env bash
# Train one stage on every GPU of this node, one process per GPU started by torchrun:
#   scripts/torchrun_node.sh experiment=dit_256 [more overrides]
# NPROC: processes (default: the GPUs nvidia-smi lists). RUN_NAME: the run folder logs/<task>/<RUN_NAME>
# (default: the start time; give the same name again to resume: the run continues from its last.ckpt).
# Lightning reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "$NPROC" -lt 1 ]; then
  echo "torchrun_node.sh: no GPU found; set NPROC (and trainer.accelerator=cpu to train on CPU processes)" >&2
  exit 2
fi
RUN_NAME=${RUN_NAME:-$(date +%Y-%m-%d_%H-%M-%S)}   # one name for all ranks (each rank composes its own config)
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
  train.py trainer=ddp trainer.devices="$NPROC" run_name="$RUN_NAME" ckpt_path=last "$@"
