"""Export a distilled student to ONNX and check onnxruntime gives PyTorch's outputs.

    python examples/export_onnx.py export/student --out student.onnx

Needs the onnx, onnxscript and onnxruntime packages (the project's `examples` extra).
"""
import argparse
from pathlib import Path

import numpy as np
import onnxruntime
import timm
import torch

parser = argparse.ArgumentParser(description='export a student to ONNX, checked against PyTorch')
parser.add_argument('export', help='export folder of the student (model.safetensors + config.json)')
parser.add_argument('--out', help='ONNX file to write (default: student.onnx in the export folder)')
args = parser.parse_args()
out = Path(args.out or Path(args.export) / 'student.onnx')

model = timm.create_model(f'local-dir:{args.export}', pretrained=True).eval()
size = timm.data.resolve_data_config(model=model)['input_size']
example = torch.randn(2, *size)
batch = torch.export.Dim('batch', min=1, max=1024)
program = torch.onnx.export(model, (example,), dynamo=True, input_names=['images'], output_names=['logits'],
                            dynamic_shapes=({0: batch},), verbose=False)
program.save(str(out))

session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
images = torch.randn(3, *size)  # another batch size than the export's example
with torch.no_grad():
    expected = model(images).numpy()
got = session.run(['logits'], {'images': images.numpy()})[0]
np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
print(f'wrote {out}: onnxruntime matches PyTorch to {np.abs(got - expected).max():.1e} on a batch of 3')
