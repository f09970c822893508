#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded shapes-world model: a 3-region edit and a generation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mrgd edit examples/three_regions.json -o out/demo-edit --method mrgd --force  # the file says p2p
.venv/bin/mrgd generate examples/layout.json -o out/demo-generate --force
echo "look at out/demo-edit/grid.png (source | target) and out/demo-generate/image.png"
