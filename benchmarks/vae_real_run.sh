#!/bin/bash
# The real VAE training run of docs/benchmarks.md ("Sparse SDF VAE"), in stages so that it can span several
# device calls (one call may take 10 minutes; training runs in its own process group meanwhile).
#   bash benchmarks/vae_real_run.sh prep  WORK MESHES   # procedural corpus + MESHES/{train,val} -> WORK/data/train/shards/train-*.tar
#                                                       # and WORK/data/val/shards/val-*.tar at 256
#   bash benchmarks/vae_real_run.sh train WORK [MIN]    # starts vae_multires at 256 in the background (MIN minutes;
#                                                       # validation + checkpoint every VAL_EVERY steps, default 400)
#   bash benchmarks/vae_real_run.sh watch WORK SECONDS  # prints the training log until it ends or SECONDS pass
#   bash benchmarks/vae_real_run.sh eval  WORK          # held-out reconstructions + metrics -> WORK/eval.jsonl
# MESHES comes from `python benchmarks/vae_corpus_split.py` (real meshes shipped in pyvista, pymeshfix and
# pybullet). Data prep uses the PyTorch distance backend on the GPU (no open3d on that machine).
set -euo pipefail
stage=$1
W=$2
RUN=$W/logs/vae_multires/real

case $stage in
prep)
  M=$3
  python -m data_prep.corpus out=$W/meshes/train n_procedural=100 seed=0 'real=[]'
  python -m data_prep.corpus out=$W/meshes/val n_procedural=8 seed=5000 'real=[]'
  cp "$M"/train/* $W/meshes/train/
  cp "$M"/val/* $W/meshes/val/
  # every mesh of meshes/train in the train split (val_fraction=0), every one of meshes/val pinned to val
  (cd $W/meshes/val && ls | sed 's/^/val /') > $W/val_split.txt
  for split in val train; do
    per_shard=$([ $split = val ] && echo 1 || echo 16)  # one val shard per loader worker at least
    pin=$([ $split = val ] && echo split_file=$W/val_split.txt || echo split_file=null)
    python -m data_prep input=$W/meshes/$split output=$W/data/$split "resolutions=[256]" views=0 workers=${PREP_WORKERS:-4} \
      val_fraction=0 $pin sdf.backend=torch samples_per_shard=$per_shard progress=false
  done
  ;;
train)
  minutes=${3:-14}
  setsid nohup python train.py experiment=vae_multires paths.root_dir=$W run_name=real logger=csv \
    data.train_shards=$W/data/train/shards data.val_shards=$W/data/val/shards \
    "data.resolutions=[256]" data.max_samples=2 data.batch_voxels=8000000 data.num_workers=14 \
    model.optimizer.lr=3e-4 callbacks.ema.decay=0.995 model.render_meshes=0 model.val_meshes=4 \
    trainer.val_check_interval=${VAL_EVERY:-400} trainer.limit_val_batches=4 trainer.log_every_n_steps=25 \
    callbacks.model_checkpoint.every_n_train_steps=${VAL_EVERY:-400} callbacks.progress_bar.refresh_rate=0 \
    "+trainer.max_time=00:00:$(printf %02d "$minutes"):00" > $W/train.log 2>&1 < /dev/null &
  echo "training started (pid $!), log $W/train.log"
  ;;
watch)
  end=$((SECONDS + $3))
  last=0
  while [ $SECONDS -lt $end ] && pgrep -f "run_name=real" > /dev/null; do
    sleep 5
    [ $((SECONDS - last)) -lt 60 ] && continue  # poll every 5 s, print every minute
    last=$SECONDS
    metrics=$(find $RUN -name metrics.csv 2>/dev/null | head -1)
    echo "--- $(date +%T) $(tail -c 300 $W/train.log | tr '\n' ' ' | tail -c 200)"
    [ -n "$metrics" ] && python - "$metrics" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
keys = ["step", "train/loss", "train/in", "train/ext", "train/kl", "train/tokens_per_s", "val/fscore", "val/chamfer_l1"]
for r in [r for r in rows if r.get("train/loss")][-1:] + [r for r in rows if r.get("val/loss")][-1:]:
    print({k: r[k] for k in r if any(k.startswith(p) for p in keys) and r[k]})
EOF
  done
  pgrep -f "run_name=real" > /dev/null && echo "still training" || echo "training finished"
  ;;
eval)
  python benchmarks/vae_recon_eval.py --ckpt $RUN/checkpoints/last.ckpt --shards $W/data/val/shards --split val \
    --out $W/recon.npz --recon $W/recon.npz --meshes $W/meshes/val | tee $W/eval.jsonl
  ;;
*)
  echo "unknown stage $stage (prep, train, watch, eval)" >&2
  exit 2
  ;;
esac
