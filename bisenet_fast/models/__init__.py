from bisenet_fast.models.bisenetv2 import BiSeNetV2
from bisenet_fast.models.fcn_head import FCNHead
from bisenet_fast.models.fused_training import use_fused_ge_training
from bisenet_fast.models.recompute_detail import use_recomputing_detail_branch
from bisenet_fast.models.segmentor import BiSeNetV2Segmentor

__all__ = ["BiSeNetV2", "BiSeNetV2Segmentor", "FCNHead", "use_fused_ge_training", "use_recomputing_detail_branch"]
