# Mask R-CNN, COCO, 1x schedule (paper Table 5) on a ScaleKD Swin-T student (timm swin_tiny_patch4_window7_224).
#   scalekd export RUN/last.pth --format mmdet --out work_dirs/swin-t-scalekd
# The export is already in mmdet's layout (patch merging in its unfold order): convert_weights=False.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        convert_weights=False,
        init_cfg=dict(type='Pretrained', checkpoint='work_dirs/swin-t-scalekd/model.pth')))
