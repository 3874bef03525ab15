#!/usr/bin/env bash
# The ablation study of the demo (the docs, "Learning on the embedded dataset"): MISA on the
# embedded Pendulum dataset, one sweep per axis, seeds 0 and 1, 8,000 steps, an evaluation every
# 1,000. The axes are relative to the pendulum preset as it was before the study (64x64 networks,
# set explicitly here). Two trials at a time fit a 2-core machine (about 3 minutes per 64-wide
# trial, 10 per 256-wide one). Then:  python bench/studies/demo_ablation_table.py OUT
set -u
out=${1:-sweeps/demo-ablation}
export OMP_NUM_THREADS=1
common="--seeds 0,1 --steps 8000 --eval-every 1000 --max-concurrent 2 --cpus-per-trial 1 --no-progress --no-tensorboard"
small="--set policy_hidden=64-64 --set critic_hidden=64-64"
run() { name=$1; shift; [ -f "$out/$name/done" ] && return; mkdir -p "$out"
        misa-fast sweep $common --out "$out/$name" "$@" > "$out/$name.log" 2>&1 && touch "$out/$name/done"; }
run base $small --algos misa
run td3bc --algos td3bc
run qscale $small --grid actor_q_scale=2.5
run plr $small --grid policy_lr=3e-5
run wide --set policy_hidden=256-256 --set critic_hidden=256-256
run critic256 --set policy_hidden=64-64 --set critic_hidden=256-256
run wide128 --set policy_hidden=128-128 --set critic_hidden=128-128
run minq $small --grid min_q_weight=1,20
run bcw $small --grid bc_weight=0.1,2.0
run variants $small --algos misa-biased no-ba misa-dv cql ba
run clr $small --grid critic_lr=1e-4
run ent $small --grid target_entropy=0
run lag $small --grid lagrange=true
run k50 $small --grid num_samples=50
run obsnorm $small --obs-norm per-dim
