#!/usr/bin/env bash
# The GPU measurements in one go, on a CUDA machine where `import mrgd` works (pip install -e ., or PYTHONPATH=src):
#
#     bash benchmarks/gpu.sh [SECONDS] [RESULTS_ARCHIVE]
#
# Runs, most important first, each under its own time limit and all within SECONDS (default 520): one edit per method
# at 512² on SD 1.5's architecture (fp16, then bf16) and at 1024² on SDXL's (fp16), against the plain diffusers
# pipeline (speed.py); the CUDA path's pixels, repeatability and syncs (cuda_check.py; again with guidance through
# the VAE, in bf16 there); GPU memory over 50 edits (memory.py); the embedded model's speed; seconds per inversion;
# torch.compile of the UNet's blocks. Results go to benchmarks/results (speed.* gain CUDA tables beside the CPU
# ones); with RESULTS_ARCHIVE they are also packed there after every step, so a run cut short keeps what it finished.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
budget=${1:-520}
archive=${2:-}
end=$((SECONDS + budget))

pack() {
    [ -n "$archive" ] && tar czf "$archive" benchmarks/results/speed.json benchmarks/results/speed.md \
        $(ls benchmarks/results/*cuda* 2>/dev/null)
}

step() {  # step LIMIT COMMAND...: run COMMAND for at most LIMIT seconds, or what is left of the budget
    local limit=$1 left=$((end - SECONDS)) t0=$SECONDS
    shift
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then echo "== skipped (budget spent): $*"; return; fi
    echo "== $* (at most ${limit} s)"
    timeout "$limit" "$@"
    echo "== rc $? in $((SECONDS - t0)) s"
    pack
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers, pydantic; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'pydantic', pydantic.__version__, torch.cuda.get_device_name())" || exit 1

methods="multidiffusion;p2p;mrgd:guidance_vae=full,guidance_precision=decoder;mrgd:guidance_vae=full;mrgd:guidance_vae=tiny;mrgd:guidance_vae=tiny,guidance_picture=vae"
step 100 python3 benchmarks/speed.py --arch sd15 --size 512 --steps 20 --methods "$methods"
step 45 python3 benchmarks/speed.py --arch sd15 --size 512 --steps 20 --dtype bfloat16 --methods "p2p;mrgd"
step 130 python3 benchmarks/speed.py --arch sdxl --size 1024 --steps 20 --methods "multidiffusion;p2p;mrgd:guidance_vae=full,guidance_precision=decoder;mrgd:guidance_vae=full;mrgd:guidance_vae=tiny;mrgd:guidance_vae=tiny,guidance_picture=vae"
step 60 python3 benchmarks/cuda_check.py --dtypes float16,bfloat16
step 45 python3 benchmarks/cuda_check.py --dtypes float16 --guidance-vae full --out benchmarks/results/cuda-check-vae
step 60 python3 benchmarks/memory.py --device cuda --steps 5 --out benchmarks/results/memory-cuda
step 60 python3 benchmarks/speed.py --arch embedded --repeats 3 --methods "$methods"
step 80 python3 benchmarks/inversion.py --device cuda --n 3 --out benchmarks/results/inversion-cuda
step 150 python3 benchmarks/speed.py --arch sd15 --size 512 --steps 20 --compile --methods "p2p;mrgd"
echo "== done in $SECONDS s"
