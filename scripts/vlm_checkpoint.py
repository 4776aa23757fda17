"""Carry the embedded VLM's training checkpoint across machines: pack it into a folder that can be committed
(trainable tensors in float32, the optimizer's moments in bfloat16 — half the size), and unpack it back into the run
folder that `tokensieve train vlm --out RUN` resumes from.

    python scripts/vlm_checkpoint.py pack   RUN/checkpoint checkpoints/vlm
    python scripts/vlm_checkpoint.py unpack checkpoints/vlm RUN/checkpoint

Resuming from a packed checkpoint continues the same run with moments rounded to bfloat16 (not bit-identical to an
uninterrupted run); the unpack records that in the checkpoint's chunk list, so the shipped train.json says so.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def pack(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "trainable.safetensors", dst / "trainable.safetensors")
    shutil.copy2(src / "state.json", dst / "state.json")
    opt = load_file(str(src / "optimizer.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in opt.items()}, str(dst / "optimizer-bf16.safetensors"))


def unpack(src: Path, dst: Path) -> None:
    if dst.exists():
        sys.exit(f"{dst} exists: move it away first (this would replace a checkpoint)")
    dst.mkdir(parents=True)
    shutil.copy2(src / "trainable.safetensors", dst / "trainable.safetensors")
    opt = load_file(str(src / "optimizer-bf16.safetensors"))
    save_file({k: v.to(torch.float32) for k, v in opt.items()}, str(dst / "optimizer.safetensors"))
    state = json.loads((src / "state.json").read_text())
    chunks = state.get("chunks", [])
    if chunks:
        chunks[-1]["note"] = "checkpoint carried to another machine; optimizer moments rounded to bfloat16"
    (dst / "state.json").write_text(json.dumps(state, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("pack", "unpack"):
        sys.exit(__doc__)
    (pack if sys.argv[1] == "pack" else unpack)(Path(sys.argv[2]), Path(sys.argv[3]))
