"""torch.compile of a whole training step (the five heads' OHEM losses, backward) on the fused
model, with and without the recomputing switches, against the same model uncompiled: losses,
every parameter gradient and the BatchNorm running statistics. torch.compile's handling of
autograd differs between torch releases (torch 2.11 zeroed every gradient of an
autograd.Function whose output forward had mutated in place, pytorch/pytorch#180642), and
only a whole-model step covers every op and module the training CLI puts together."""
import copy

import pytest
import torch
from torch import nn

import bisenet_fast as bf
from bisenet_fast.models import use_fused_ge_training, use_recomputing_detail_branch
from tests.helpers import assert_close_to_scale


def _training_step(model, loss_fn, images, labels):
    model.zero_grad(set_to_none=True)
    losses = loss_fn(images, labels)
    sum(losses.values()).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return losses, grads, dict(model.named_buffers())


@pytest.mark.parametrize(
    "transforms",
    [(), (use_fused_ge_training, use_recomputing_detail_branch)],
    ids=["fused", "fused+recompute"],
)
def test_compiled_training_step_matches_uncompiled(transforms):
    torch.manual_seed(0)
    model = bf.BiSeNetV2Segmentor(num_classes=5, ohem=True, ohem_min_kept=50).train()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0  # the heads' dropout draws are not what is compared here
    for transform in transforms:
        transform(model)
    twin = copy.deepcopy(model)
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 5, (2, 64, 96), generator=torch.Generator().manual_seed(2))
    labels[:, :6] = 255

    losses, grads, buffers = _training_step(model, model.loss, images, labels)
    # aot_eager: Dynamo and AOTAutograd, where the gradients are routed, without Inductor's
    # code generation (a minute a compile on this CPU). fullgraph: no graph break anywhere in
    # the step, so nothing of it runs uncompiled.
    compiled_loss = torch.compile(twin.loss, backend="aot_eager", fullgraph=True)
    losses_c, grads_c, buffers_c = _training_step(twin, compiled_loss, images, labels)

    assert list(losses_c) == list(losses)
    for key, value in losses.items():
        torch.testing.assert_close(losses_c[key], value, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads.keys()
    for name, grad in grads.items():
        assert_close_to_scale(grads_c[name], grad, 1e-4, name)
    for name, value in buffers.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(buffers_c[name], value), name
        else:
            assert_close_to_scale(buffers_c[name], value, 1e-5, name)
