#!/usr/bin/env bash
# A plain install runs the CLI: build the wheel, install it without the dev extra into a fresh venv (no
# open_clip, no editable checkout), and train the demo recipe for a few steps from another directory.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$py" -m pip wheel -q --no-deps -w "$work/dist" "$repo"
"$py" -m pip install -q "$work"/dist/mmclip-*.whl
if "$py" -c "import open_clip" 2>/dev/null; then echo "open_clip is installed: not a plain install" >&2; exit 1; fi
cd "$work"
"$work/venv/bin/mmclip" train experiment=shapes_tiny run_dir="$work/run" \
  trainer.max_steps=3 data.n_train=256 data.n_val=16 data.n_test=30 data.batch_size=16 data.num_workers=0
test -f "$work/run/checkpoints/last.ckpt"
test -f "$work/run/report/metrics.json"
# the NaFlex recipe ships too: native-aspect batches under a patch budget
"$work/venv/bin/mmclip" train experiment=siglip2_naflex_tiny run_dir="$work/naflex" report=false callbacks=none \
  logger=none trainer.max_steps=2 data.n_train=64 data.n_val=0 data.n_test=0 data.batch_size=16 data.num_workers=0 \
  data.naflex_batching=budget
"$py" -c "import mmclip; print(mmclip.get_tokenizer('ViT-B-32')(['a photo of a dog'])[0, :7].tolist())"
echo "wheel check passed: plain install trains the demo recipe from $work"
