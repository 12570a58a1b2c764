"""ScaleKD as a Lightning LightningModule: the distiller's loss is the training step.

    python examples/lightning_module.py --data /data/flowers --devices 4     # <data>/train/<class>/*.jpg
    python examples/lightning_module.py --tiny                               # offline smoke run

Lightning handles devices, DDP and precision; the frozen teacher stays in eval mode inside the
distiller, and the optimizer gets the student and the projectors only.
"""
import argparse

import lightning as L
import timm
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import FakeData, ImageFolder

import scalekd


class ScaleKDModule(L.LightningModule):
    """A distiller trained by Lightning; ``self.distiller.student`` is the plain timm student."""

    def __init__(self, distiller: scalekd.Distiller, lr: float = 1e-3):
        super().__init__()
        self.distiller, self.lr = distiller, lr

    def training_step(self, batch, batch_idx):
        out = self.distiller(*batch)
        self.log_dict({k: v for k, v in out.items() if k != 'output'}, prog_bar=True)
        return out['loss']

    def configure_optimizers(self):
        params = self.distiller.trainable_module.parameters()  # student + projectors, no teacher
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.05)
        return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.max_epochs)]


parser = argparse.ArgumentParser(description='ScaleKD with Lightning')
parser.add_argument('--data', help='image folder with train/<class>/ sub-folders')
parser.add_argument('--teacher', default='vit_base_patch16_224.augreg2_in21k_ft_in1k')
parser.add_argument('--student', default='resnet50')
parser.add_argument('--devices', default='auto')
parser.add_argument('--precision', default='bf16-mixed', help="Lightning's precision (16-mixed on GPUs without bf16)")
parser.add_argument('--epochs', type=int, default=30)
parser.add_argument('--out', default='export/student', help='export folder of the trained student')
parser.add_argument('--tiny', action='store_true', help="timm's test models with random weights, 64 px, "
                                                        'generated images, two steps')
args = parser.parse_args()

size = 64 if args.tiny else 224
names = ('test_vit', 'test_resnet') if args.tiny else (args.teacher, args.student)
classes = 3 if args.tiny else len(ImageFolder(f'{args.data}/train').classes)
distiller = scalekd.build_distiller(*names, img_size=size, num_classes=classes, teacher_pretrained=not args.tiny,
                                    kd=False)  # the hub teacher's classes are not yours: features only
data_config = timm.data.resolve_data_config(dict(input_size=(3, size, size)), model=distiller.student)
transform = timm.data.create_transform(**data_config, is_training=True)
dataset = FakeData(16, (3, size, size), classes, transform) if args.tiny else ImageFolder(f'{args.data}/train', transform)

trainer = L.Trainer(max_epochs=1 if args.tiny else args.epochs, max_steps=2 if args.tiny else -1,
                    devices=1 if args.tiny else args.devices, precision='32' if args.tiny else args.precision,
                    logger=not args.tiny, enable_checkpointing=not args.tiny, enable_progress_bar=not args.tiny)
trainer.fit(ScaleKDModule(distiller), DataLoader(dataset, batch_size=4 if args.tiny else 64, shuffle=True,
                                                 num_workers=0 if args.tiny else 8))
if trainer.is_global_zero:
    print(f'wrote {scalekd.export_student(distiller.student, args.out, data_config)}')
