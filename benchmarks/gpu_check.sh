#!/usr/bin/env bash
# Run the GPU-only paths end to end on a CUDA machine: the test suite with CUDA visible, the quick demo,
# then SFT, reward modeling, DPO and PPO with --peft qlora (4-bit NF4 base) and one bf16 LoRA run.
# Usage: benchmarks/gpu_check.sh [WORKDIR]   (needs tunelab installed with the [qlora] extra)
set -euo pipefail
work=${1:-/tmp/tunelab-gpu}
rm -rf "$work" && mkdir -p "$work"
python3 -c "import torch, bitsandbytes; assert torch.cuda.is_available(), 'no CUDA device'; print('cuda', torch.cuda.get_device_name(0), 'bitsandbytes', bitsandbytes.__version__)"

python3 -m tunelab demo --quick --output "$work/demo"
world=$work/demo/world
sft_model=$work/demo/sft/merged

common=(--quiet --epochs 1 --batch-size 8 train.log_every=5)
python3 -m tunelab sft --model "$work/demo/base/final" --data "$world/instructions.jsonl" --output "$work/qsft" \
    --peft qlora "${common[@]}" --lr 2e-3
python3 -m tunelab rm --model "$sft_model" --data "$world/pairs.jsonl" --output "$work/qrm" \
    --peft qlora "${common[@]}" --lr 2e-3
python3 -m tunelab dpo --model "$sft_model" --data "$world/pairs.jsonl" --output "$work/qdpo" \
    --peft qlora "${common[@]}" --lr 2e-3
python3 -m tunelab ppo --model "$sft_model" --data "$world/ppo_prompts.jsonl" --reward "$work/qrm" \
    --output "$work/qppo" --peft qlora --quiet --max-steps 4 --batch-size 16 generation.max_new_tokens=32
python3 -m tunelab sft --model "$work/demo/base/final" --data "$world/instructions.jsonl" --output "$work/bf16" \
    "${common[@]}" --lr 2e-3 train.precision=bf16
python3 -m tunelab generate --model "$work/qsft" --prompts "$world/prompts.jsonl" --output "$work/gen.jsonl" --max-new-tokens 24
python3 -m tunelab eval --model "$work/qdpo" --data "$world/prompts.jsonl" --reward "$work/qrm" --ref "$sft_model" \
    --limit 16 --output "$work/eval.json"
python3 - "$work" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
for run in ["qsft", "qrm", "qdpo", "qppo", "bf16"]:
    rows = [json.loads(l) for l in (work / run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r and r.get("split", "train") == "train"]
    keys = {k: rows[-1][k] for k in rows[-1] if isinstance(rows[-1][k], (int, float))}
    print(f"{run}: {len(train)} logged steps; first loss {train[0].get('loss') if train else None}; last {keys}")
    cfg = (work / run / "config.yaml").read_text().splitlines()[0]
    print("   ", cfg)
print("eval:", json.loads((work / "eval.json").read_text()))
print("generated:", (work / "gen.jsonl").read_text().splitlines()[0][:200])
PY
echo "gpu check: all stages finished"
