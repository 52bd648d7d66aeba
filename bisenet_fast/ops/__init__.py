"""Fused operators. Each has an eager reference (the oracle) and fused kernels chosen
through bisenet_fast.backends."""
from bisenet_fast.ops.bga import bga_aggregate, bga_aggregate_reference
from bisenet_fast.ops.bga_pointwise import bga_pointwise_aggregate, bga_pointwise_aggregate_reference
from bisenet_fast.ops.conv3x3_winograd import conv3x3_winograd, conv3x3_winograd_reference, winograd_weight
from bisenet_fast.ops.ge_expand_train import ge_expand_train, ge_expand_train_reference
from bisenet_fast.ops.ge_layer import (
    ge_layer_stride1,
    ge_layer_stride1_reference,
    ge_layer_stride2,
    ge_layer_stride2_reference,
    pack_triton_stride1,
    pack_triton_stride2,
)
from bisenet_fast.ops.ohem_cross_entropy import ohem_cross_entropy, ohem_cross_entropy_reference
from bisenet_fast.ops.resize_bilinear import resize_bilinear, resize_bilinear_reference

__all__ = [
    "bga_aggregate",
    "bga_aggregate_reference",
    "bga_pointwise_aggregate",
    "bga_pointwise_aggregate_reference",
    "conv3x3_winograd",
    "conv3x3_winograd_reference",
    "ge_expand_train",
    "ge_expand_train_reference",
    "ge_layer_stride1",
    "ge_layer_stride1_reference",
    "ge_layer_stride2",
    "ge_layer_stride2_reference",
    "ohem_cross_entropy",
    "ohem_cross_entropy_reference",
    "pack_triton_stride1",
    "pack_triton_stride2",
    "resize_bilinear",
    "resize_bilinear_reference",
    "winograd_weight",
]
