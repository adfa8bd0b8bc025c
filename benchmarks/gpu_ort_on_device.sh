#!/usr/bin/env bash
# On a lent GPU machine (no internet): reassemble the carried onnxruntime-gpu wheel, install it
# beside the image's packages (never over them), and run benchmarks/gpu_ort.py into $OUT.
#
#   bash benchmarks/gpu_ort_on_device.sh PARTS_DIR [gpu_ort.py arguments...]
#
# PARTS_DIR holds `onnxruntime_gpu-*.whl.part-*` (made here with `split -b 55M WHEEL WHEEL.part-`),
# carried one per `run` while the machine stays warm. Defaults: ViT-B-32 first, then ViT-L-14.
set -euo pipefail
parts=${1:?usage: gpu_ort_on_device.sh PARTS_DIR [gpu_ort.py arguments...]}
shift
out=${OUT:-/tmp/gpu-ort-out}
site=/tmp/ortgpu-site
if [ ! -d "$site/onnxruntime" ]; then
    first=$(ls "$parts"/*.whl.part-* | head -n 1)
    wheel="/tmp/$(basename "${first%.part-*}")"
    cat "$parts"/*.whl.part-* > "$wheel"
    python -m pip install --quiet --no-deps --target "$site" "$wheel"
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
python benchmarks/gpu_ort.py --out "$out" --work /tmp/gpu-ort-work "${@:---models=ViT-B-32,ViT-L-14}"
