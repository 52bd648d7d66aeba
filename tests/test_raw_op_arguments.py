"""The C++ ops called directly (torch.ops.bisenet_fast.*, past the Python fronts) with None for
a Tensor argument: the dispatcher passes an undefined tensor, which every kernel refuses by
name. (An op whose only tensor is None fails in the dispatcher itself: resize_bilinear.) And
the ops without a backward, compiled, with an input that requires grad."""
import pytest
import torch

import bisenet_fast  # noqa: F401  (registers the ops)
from tests.helpers import requires_cuda_build


def valid_calls():
    """(op name, arguments) of a valid call of each op with more than one Tensor argument."""
    r = torch.randn
    low = [r(1, 2, 2, 2) for _ in range(3)]
    x2 = r(2, 2, 3, 3)
    ge_expand = [x2, r(12, 1, 3, 3), torch.ones(12), torch.zeros(12)]
    return {
        "bga_aggregate": [r(1, 2, 4, 4), *low],
        "bga_aggregate_backward": [r(1, 2, 4, 4), r(1, 2, 4, 4), *low],
        "bga_pointwise_aggregate": [r(1, 2, 4, 4), r(2, 2), r(2), *low],
        "ge_layer_stride1": [r(1, 2, 3, 3), r(1, 2, 3, 3), r(12, 1, 3, 3), r(12), r(2, 12), r(2)],
        "ge_layer_stride2": [r(1, 2, 4, 4), r(1, 2, 4, 4), r(12, 1, 3, 3), r(12), r(12, 1, 3, 3), r(12), r(4, 12), r(4),
                             r(2, 1, 3, 3), r(2), r(4, 2), r(4)],
        "conv3x3_winograd": [r(1, 2, 4, 4), r(36, 2, 3), r(3), False],
        "ge_expand_train": [*ge_expand, 1, True, 1e-5],
        "ge_expand_train_backward": [r(2, 12, 3, 3), *ge_expand, torch.zeros(12), torch.ones(12), 1, True, 1e-5],
        "ohem_cross_entropy_forward": [r(1, 3, 2, 2), torch.randint(0, 3, (1, 4, 4)), 0.7, 1, 255],
        "ohem_cross_entropy_backward": [torch.tensor(1.0), r(1, 3, 2, 2), torch.randint(0, 3, (1, 4, 4)),
                                        torch.tensor(0.7), 255],
    }


# The ops with CUDA kernels: a CUDA kernel runs when any argument is a CUDA tensor, so it
# must check the tensor its device guard is made from before making it.
CUDA_OPS = ("bga_aggregate", "bga_aggregate_backward", "ge_layer_stride1", "ge_layer_stride2",
            "ohem_cross_entropy_forward", "ohem_cross_entropy_backward")
CASES = [
    pytest.param(op, index, device, id=f"{op}-{index}" + ("-cuda" if device == "cuda" else ""),
                 marks=[requires_cuda_build] if device == "cuda" else [])
    for device in ("cpu", "cuda")
    for op, args in valid_calls().items()
    for index, arg in enumerate(args)
    if isinstance(arg, torch.Tensor) and (device == "cpu" or op in CUDA_OPS)
]


def calls_on(device, op_name):
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in valid_calls()[op_name]]


@pytest.mark.parametrize("op_name, index, device", CASES)
def test_none_for_a_tensor_is_refused_by_name(op_name, index, device):
    op = getattr(torch.ops.bisenet_fast, op_name)
    args = calls_on(device, op_name)
    with torch.no_grad():
        op(*args)  # the call is valid as it stands
        name = op.default._schema.arguments[index].name
        args[index] = None
        with pytest.raises(TypeError, match=f"^[a-z_0-9]+: {name} must be a tensor, got None"):
            op(*args)


@requires_cuda_build
@pytest.mark.parametrize("op_name", ["ge_layer_stride1", "ge_layer_stride2"])
def test_ge_layer_cuda_names_a_cpu_x(op_name):
    # x on the CPU, the rest on the GPU: the CUDA kernel runs, and x made its device guard
    # ("CUDAGuardImpl initialized with non-CUDA DeviceType: cpu", naming nothing).
    op = getattr(torch.ops.bisenet_fast, op_name)
    args = calls_on("cuda", op_name)
    args[0] = args[0].cpu()
    with torch.no_grad(), pytest.raises(ValueError, match=f"^{op_name}: x must be a CUDA tensor"):
        op(*args)


INFERENCE_ONLY_OPS = ("bga_pointwise_aggregate", "ge_layer_stride1", "ge_layer_stride2", "conv3x3_winograd",
                      "resize_bilinear")


def inference_only_call(op_name):
    """A valid call of an op without a backward (resize_bilinear's only tensor is x)."""
    return [torch.randn(1, 2, 4, 4), [8, 8]] if op_name == "resize_bilinear" else valid_calls()[op_name]


@pytest.mark.parametrize("op_name", INFERENCE_ONLY_OPS)
@pytest.mark.parametrize("which", ["first", "last"], ids=["first-tensor", "last-tensor"])
def test_compiled_inference_only_op_refuses_an_input_that_requires_grad(op_name, which):
    # Compiled, the kernel runs with grad mode off, past its own refusal (inference_only.h):
    # the gradient of such an input would silently never arrive. The fake kernel refuses it
    # while tracing, naming the input, as the kernel does in eager mode.
    op = getattr(torch.ops.bisenet_fast, op_name)
    args = inference_only_call(op_name)
    index = max(i for i, a in enumerate(args) if isinstance(a, torch.Tensor)) if which == "last" else 0
    args[index].requires_grad_()
    name = op.default._schema.arguments[index].name
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a), backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=f"{op_name} is inference-only \\(no backward\\), but {name} requires grad"):
        compiled(*args)
