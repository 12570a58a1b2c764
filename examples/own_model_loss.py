"""ScaleKD as a loss for a student that is not a timm model: here torchvision's ResNet-50.

    python examples/own_model_loss.py --data /data/flowers     # <data>/train/<class>/*.jpg
    python examples/own_model_loss.py --tiny                   # offline smoke run

Your code runs the student and hands its last two stage maps (s3, s4) and logits to
scalekd.ScaleKDLoss, which runs the frozen teacher, projects the maps (CAP, DFM, TPP) and returns
the weighted loss with every term. The same works for a detector's backbone or a Hugging Face model.
"""
import argparse

import timm
import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision.datasets import FakeData, ImageFolder

import scalekd

parser = argparse.ArgumentParser(description='ScaleKD as a loss on your own model')
parser.add_argument('--data', help='image folder with train/<class>/ sub-folders')
parser.add_argument('--teacher', default='vit_base_patch16_224.augreg2_in21k_ft_in1k')
parser.add_argument('--epochs', type=int, default=30)
parser.add_argument('--out', default='student.pth', help="the trained student's state dict")
parser.add_argument('--tiny', action='store_true', help="timm's test ViT with random weights, ResNet-18, 64 px, "
                                                        'generated images, two steps')
args = parser.parse_args()
size = 64 if args.tiny else 224
classes = 3 if args.tiny else len(ImageFolder(f'{args.data}/train').classes)
student = (torchvision.models.resnet18 if args.tiny else torchvision.models.resnet50)(num_classes=classes)


def features(images):
    """The student's forward, keeping its last two stage maps."""
    m = student
    x = m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(images))))))
    s3 = m.layer3(x)
    s4 = m.layer4(s3)
    return s3, s4, m.fc(torch.flatten(m.avgpool(s4), 1))


with torch.no_grad():  # the shapes of one sample's maps
    s3, s4, _ = features(torch.zeros(2, 3, size, size))
loss_fn = scalekd.ScaleKDLoss('test_vit' if args.tiny else args.teacher, s3.shape[1:], s4.shape[1:], img_size=size,
                              num_classes=classes, teacher_pretrained=not args.tiny, kd=False)  # features only

mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ScaleKDLoss's default input normalisation
transform = timm.data.create_transform(size, is_training=True, mean=mean, std=std)
dataset = FakeData(16, (3, size, size), classes, transform) if args.tiny else ImageFolder(f'{args.data}/train', transform)
loader = DataLoader(dataset, batch_size=4 if args.tiny else 64, shuffle=True, num_workers=0 if args.tiny else 8)

# the optimizer gets your model and the loss's projectors
optimizer = torch.optim.AdamW([*student.parameters(), *loss_fn.projectors.parameters()], lr=1e-3, weight_decay=0.05)
for epoch in range(1 if args.tiny else args.epochs):
    student.train()
    loss_fn.train()  # the teacher stays in eval mode
    for step, (images, targets) in enumerate(loader):
        s3, s4, logits = features(images)
        out = loss_fn(images, s3, s4, logits, targets)   # {'loss', 'task_loss', 'proxy_ori', 's4_ori', ...}
        optimizer.zero_grad()
        out['loss'].backward()
        optimizer.step()
        if args.tiny and step == 1:
            break
    print(f'epoch {epoch + 1}: ' + '  '.join(f'{k} {v.item():.4g}' for k, v in out.items()))
torch.save(student.state_dict(), args.out)
print(f'wrote {args.out}')
