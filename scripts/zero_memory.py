#!/usr/bin/env python
"""Per-rank peak memory of a 2-process ScaleKD run, plain DDP against ``train.zero: true``.

    .venv/bin/python scripts/zero_memory.py                      # Swin-S -> ResNet-50 at 224, SGD and AdamW
    .venv/bin/python scripts/zero_memory.py --teacher vit_tiny_patch16_224 --student resnet18 --img-size 64

Each run is ``torchrun --nproc_per_node 2 -m scalekd.cli train`` (gloo on CPU, NCCL on GPUs) of 4
steps on a generated image folder with random weights; the figure is the epoch record's
``train_peak_mem_mb``: the largest per-rank peak since the models were built (CPU: the resident set's
high-water mark, reset after the build; CUDA: ``max_memory_allocated``). Prints a markdown table
beside the size of the projectors' optimizer state, which ``train.zero`` shards.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from scalekd.task.builder import build_distiller


def image_folder(root: Path, size: int, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (('train', per_class), ('val', 2)):
        for c in range(2):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    return root


def run(args, data: Path, out: Path, opt: str, zero: bool, port: int) -> float:
    cfg = dict(
        output=str(out), teacher=dict(model=args.teacher), student=dict(model=args.student),
        distill=dict(method='scalekd'),
        data=dict(root=str(data), img_size=args.img_size, num_classes=2, workers=0, val_batch_size=2),
        optim=dict(opt=opt, lr=1e-3, weight_decay=0.05, momentum=0.9),
        sched=dict(epochs=1, warmup_epochs=0),
        train=dict(batch_size=4, precision='fp32', zero=zero, eval_every=1),
        log=dict(progress=False, tensorboard=False, console=False))
    out.mkdir(parents=True)
    (out.parent / f'{out.name}.yaml').write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port),
           '-m', 'scalekd.cli', 'train', str(out.parent / f'{out.name}.yaml'), '--device', args.device]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f'{" ".join(cmd)} failed:\n{result.stderr[-3000:]}')
    records = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    return max(r['train_peak_mem_mb'] for r in records if 'train_peak_mem_mb' in r)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--teacher', default='swin_small_patch4_window7_224')
    parser.add_argument('--student', default='resnet50')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--opts', default='sgd,adamw')
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args()
    distill = build_distiller(args.teacher, args.student, img_size=args.img_size, num_classes=2).distill_modules()
    slot_mb = sum(p.numel() * 4 for p in distill.parameters()) / 2 ** 20  # one fp32 optimizer slot per weight
    print(f'{args.teacher} -> {args.student} at {args.img_size}, 2 processes x batch 2, fp32 on {args.device}; '
          f'projectors {slot_mb:.0f} MB per fp32 copy (weights, gradients, each optimizer slot)\n')
    print('| optimizer | plain DDP peak MB per rank | train.zero peak MB per rank | saved MB | '
          'half the projectors\' optimizer state MB |')
    print('|---|---|---|---|---|')
    with tempfile.TemporaryDirectory() as tmp:
        data = image_folder(Path(tmp) / 'data', args.img_size)
        for i, opt in enumerate(args.opts.split(',')):
            plain = run(args, data, Path(tmp) / f'{opt}-plain', opt, False, 29600 + 2 * i)
            zero = run(args, data, Path(tmp) / f'{opt}-zero', opt, True, 29601 + 2 * i)
            slots = 2 if opt in ('adam', 'adamw') else 1
            print(f'| {opt} ({slots} slot{"s" * (slots > 1)}) | {plain:.0f} | {zero:.0f} | {plain - zero:.0f} | '
                  f'{slots * slot_mb / 2:.0f} |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
