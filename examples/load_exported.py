"""Load a distilled student with plain timm (no scalekd import) and classify an image.

    scalekd export runs/own-data/best.pth --out export/student     # or examples/own_loop.py's export
    python examples/load_exported.py export/student --image flower.jpg

An export folder holds model.safetensors and timm's config.json (architecture, classes, input size,
normalisation), so timm builds the model from the folder alone, or from its name and the weight file.
"""
import argparse
import json
from pathlib import Path

import timm
import torch
from PIL import Image

parser = argparse.ArgumentParser(description='run an exported student with plain timm')
parser.add_argument('export', help='export folder (model.safetensors + config.json)')
parser.add_argument('--image', help='an image to classify (default: a generated one)')
args = parser.parse_args()
folder = Path(args.export)

model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()  # everything from config.json

# or by name with the weight file; the overlay's num_classes too, else timm drops the classifier as not fitting
classes = json.loads((folder / 'config.json').read_text())['num_classes']
by_name = timm.create_model(model.pretrained_cfg['architecture'], pretrained=True, num_classes=classes,
                            pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors'), num_classes=classes)).eval()

data_config = timm.data.resolve_data_config(model=model)
transform = timm.data.create_transform(**data_config)
image = Image.open(args.image).convert('RGB') if args.image else Image.new('RGB', data_config['input_size'][1:], 'gray')
batch = transform(image).unsqueeze(0)
with torch.no_grad():
    probs = model(batch).softmax(-1)
    assert torch.equal(probs, by_name(batch).softmax(-1)), 'both ways load the same weights'
top = probs[0].topk(min(5, probs.shape[-1]))
print('  '.join(f'class {i}: {p:.3f}' for p, i in zip(top.values.tolist(), top.indices.tolist())))
