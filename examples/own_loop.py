"""ScaleKD inside your own PyTorch training loop: the distiller is the loss, the student stays plain timm.

    python examples/own_loop.py --data /data/flowers       # <data>/train/<class>/*.jpg; hub teacher weights
    python examples/own_loop.py --tiny                     # offline smoke run: tiny random models, generated images

The student ends as an export folder (model.safetensors + config.json) that plain timm loads:
examples/load_exported.py.
"""
import argparse

import timm
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import FakeData, ImageFolder

import scalekd

parser = argparse.ArgumentParser(description='ScaleKD in your own training loop')
parser.add_argument('--data', help='image folder with train/<class>/ sub-folders')
parser.add_argument('--teacher', default='vit_base_patch16_224.augreg2_in21k_ft_in1k')
parser.add_argument('--student', default='resnet50')
parser.add_argument('--epochs', type=int, default=30)
parser.add_argument('--out', default='export/student', help='export folder of the trained student')
parser.add_argument('--tiny', action='store_true', help="timm's test models with random weights, 64 px, "
                                                        'generated images, two steps')
args = parser.parse_args()
size, steps = (64, 2) if args.tiny else (224, None)
teacher, student = ('test_vit', 'test_resnet') if args.tiny else (args.teacher, args.student)

classes = 3 if args.tiny else len(ImageFolder(f'{args.data}/train').classes)
# the hub teacher predicts ImageNet's classes, not yours: distil its features only (kd=False)
distiller = scalekd.build_distiller(teacher, student, img_size=size, num_classes=classes,
                                    teacher_pretrained=not args.tiny, kd=False)
data_config = timm.data.resolve_data_config(dict(input_size=(3, size, size)), model=distiller.student)
transform = timm.data.create_transform(**data_config, is_training=True)
dataset = (FakeData(16, (3, size, size), classes, transform) if args.tiny
           else ImageFolder(f'{args.data}/train', transform))
loader = DataLoader(dataset, batch_size=4 if args.tiny else 64, shuffle=True, num_workers=0 if args.tiny else 8)

device = 'cuda' if torch.cuda.is_available() else 'cpu'
distiller.to(device)
# the student and the projectors train; the frozen teacher is not in trainable_module
optimizer = torch.optim.AdamW(distiller.trainable_module.parameters(), lr=1e-3, weight_decay=0.05)
for epoch in range(1 if args.tiny else args.epochs):
    distiller.train()  # the teacher stays in eval mode
    for step, (images, targets) in enumerate(loader):
        out = distiller(images.to(device), targets.to(device))
        optimizer.zero_grad()
        out['loss'].backward()
        optimizer.step()
        if step == steps:
            break
    print(f'epoch {epoch + 1}: ' + '  '.join(f'{k} {v.item():.4g}' for k, v in out.items() if k != 'output'))

path = scalekd.export_student(distiller.student, args.out, data_config)  # the plain timm student alone
print(f'wrote {path}')
