"""ScaleKD with Hugging Face Accelerate: your own loop, on any number of GPUs and in mixed precision.

    accelerate launch examples/accelerate_loop.py --data /data/flowers     # <data>/train/<class>/*.jpg
    python examples/accelerate_loop.py --tiny                              # offline smoke run

Accelerate prepares the trainable module (student + projectors; DDP when there are several
processes), not the frozen teacher, as the distiller's own prepare_distributed() does.
"""
import argparse

import timm
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from torchvision.datasets import FakeData, ImageFolder

import scalekd

parser = argparse.ArgumentParser(description='ScaleKD with Accelerate')
parser.add_argument('--data', help='image folder with train/<class>/ sub-folders')
parser.add_argument('--teacher', default='vit_base_patch16_224.augreg2_in21k_ft_in1k')
parser.add_argument('--student', default='resnet50')
parser.add_argument('--epochs', type=int, default=30)
parser.add_argument('--out', default='export/student', help='export folder of the trained student')
parser.add_argument('--tiny', action='store_true', help="timm's test models with random weights, 64 px, "
                                                        'generated images, two steps')
args = parser.parse_args()
accelerator = Accelerator(cpu=args.tiny)

size, names = (64, ('test_vit', 'test_resnet')) if args.tiny else (224, (args.teacher, args.student))
classes = 3 if args.tiny else len(ImageFolder(f'{args.data}/train').classes)
distiller = scalekd.build_distiller(*names, img_size=size, num_classes=classes, teacher_pretrained=not args.tiny,
                                    kd=False)  # the hub teacher's classes are not yours: features only
data_config = timm.data.resolve_data_config(dict(input_size=(3, size, size)), model=distiller.student)
transform = timm.data.create_transform(**data_config, is_training=True)
dataset = FakeData(16, (3, size, size), classes, transform) if args.tiny else ImageFolder(f'{args.data}/train', transform)
loader = DataLoader(dataset, batch_size=4 if args.tiny else 64, shuffle=True, num_workers=0 if args.tiny else 8)

distiller.to(accelerator.device)  # the teacher too
optimizer = torch.optim.AdamW(distiller.trainable_module.parameters(), lr=1e-3, weight_decay=0.05)
distiller.trainable_module, optimizer, loader = accelerator.prepare(distiller.trainable_module, optimizer, loader)
for epoch in range(1 if args.tiny else args.epochs):
    distiller.train()
    for step, (images, targets) in enumerate(loader):
        out = distiller(images, targets)
        optimizer.zero_grad()
        accelerator.backward(out['loss'])
        optimizer.step()
        if args.tiny and step == 1:
            break
    accelerator.print(f'epoch {epoch + 1}: loss {out["loss"].item():.4g}')

if accelerator.is_main_process:  # distiller.student unwraps DDP
    print(f'wrote {scalekd.export_student(distiller.student, args.out, data_config)}')
