# Mask R-CNN, COCO, 1x schedule (paper Table 5) on a ScaleKD ResNet-50-D student (timm resnet50d).
#   scalekd export RUN/last.pth --format mmdet --out work_dirs/r50d-scalekd
#   python tools/train.py mask-rcnn_r50d-scalekd_fpn_1x_coco.py     (mmdet 3.x; a plain resnet50 student: type='ResNet')
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        type='ResNetV1d',
        depth=50,
        init_cfg=dict(type='Pretrained', checkpoint='work_dirs/r50d-scalekd/model.pth')))
