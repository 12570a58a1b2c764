# UperNet, ADE20K, 512x512, 160k iterations (paper Table 6) on a ScaleKD ViT-B/16 student (timm vit_base_patch16_224).
#   scalekd export RUN/last.pth --format mmseg --out work_dirs/vit-b-scalekd
# timm's ViT has a patch-embedding bias and a final norm: patch_bias / final_norm must be on, or mmseg
# drops those weights without a word (it loads non-strictly). The 224 position embedding is resized to 512.
_base_ = 'mmseg::vit/vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.py'
model = dict(
    pretrained=None,
    backbone=dict(
        patch_bias=True,
        final_norm=True,
        init_cfg=dict(type='Pretrained', checkpoint='work_dirs/vit-b-scalekd/model.pth')))
