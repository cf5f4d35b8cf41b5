#!/usr/bin/env bash
# Every GPU figure the Performance section of README.md asks for, in one command per stage:
#
#   bash bench/gpu_figures.sh OUT_DIR [throughput] [final] [sweep]     (no stage named: all three)
#
#   throughput  bench.train_throughput at 224 px, bf16, batch 256: eager and --compile, with --sync-debug
#   final       a 50-epoch core.train at 224 px on the whole train split (the final training's cost), timed
#   sweep       bench.sweep_overhead at 1, 0.5 and 0.25 GPU per trial (needs ray and optuna)
#
# DATA (default ../shared/data/ham10000-200x150) is the dataset. Each stage writes its JSON, its log and
# nvidia-smi samples (utilisation and memory, every second) into OUT_DIR; a failed stage stops the script.
set -euo pipefail

out=${1:?usage: bash bench/gpu_figures.sh OUT_DIR [throughput] [final] [sweep]}
shift
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(throughput final sweep)
data=${DATA:-../shared/data/ham10000-200x150}
py=${PYTHON:-python3}
mkdir -p "$out"

if [ ! -d "$data" ]; then
    echo "error: no dataset at $data (set DATA=...)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"
"$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    >> "$out/gpu.txt"
cat "$out/gpu.txt"

# ImageNet weights where the torch hub cache has them (nothing can be downloaded on such machines).
pretrained=none
if [ -f "${TORCH_HOME:-$HOME/.cache/torch}/hub/checkpoints/resnet18-f37072fd.pth" ]; then
    pretrained=imagenet
fi

sampling() {  # sampling STAGE COMMAND...: run COMMAND while nvidia-smi samples the GPU into OUT/STAGE-gpu.csv
    local stage=$1
    shift
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$out/$stage-gpu.csv" &
    local sampler=$!
    local started=$SECONDS status=0
    "$@" 2>&1 | tee "$out/$stage.log" || status=$?
    kill "$sampler" 2>/dev/null || true
    echo "$stage: $((SECONDS - started)) s wall, exit $status" | tee -a "$out/summary.txt"
    return "$status"
}

for stage in "${stages[@]}"; do
    case $stage in
        throughput)
            sampling throughput "$py" -m bench.train_throughput --data "$data" --device cuda --image-size 224 \
                --batch-size 256 --precision bf16 --workers 16 --steps 30 --repeats 3 --sync-debug \
                --out "$out/gpu224.json"
            sampling throughput-compile "$py" -m bench.train_throughput --data "$data" --device cuda \
                --image-size 224 --batch-size 256 --precision bf16 --workers 16 --steps 30 --repeats 3 --compile \
                --out "$out/gpu224-compile.json"
            ;;
        final)
            sampling final "$py" -m core.train --data "$data" --out "$out/final224" --no-resume \
                --set image_size=224 --set epochs=50 --set batch_size=256 --set lr=2e-3 \
                --set pretrained="$pretrained"
            "$py" -c "import pandas as pd, sys; m = pd.read_csv(sys.argv[1]); print(f'training loops: \
{m.train_epoch_s.sum():.1f} s, median {m.train_images_per_s.median():.0f} images/s')" \
                "$out/final224/metrics.csv" | tee -a "$out/summary.txt"
            ;;
        sweep)
            sampling sweep "$py" -m bench.sweep_overhead --data "$data" --gpus 1 --gpus-per-trial 1 0.5 0.25 \
                --trials 8 --max-epochs 3 --results "$out/sweeps" --out "$out/sweep-gpu.json"
            ;;
        *)
            echo "error: unknown stage '$stage' (throughput, final, sweep)" >&2
            exit 2
            ;;
    esac
done
