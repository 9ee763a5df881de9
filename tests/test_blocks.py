"""common.blocks against their explicit formulas (moved from mmnet.py, tested as they were)."""

import pytest
import torch
import torch.nn.functional as F

from common.blocks import conv_bn_relu, dynamic_conv, linear_relu


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_bn_relu_is_conv_then_batchnorm_then_relu_keeping_the_grid(kernel):
    torch.manual_seed(0)
    block = conv_bn_relu(3, 5, kernel)
    bn = block[1]
    bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.normal_(0, 0.5)
    bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.5, 1.5)
    block.eval()
    x = torch.randn(2, 3, 7, 6)
    conv = F.conv2d(x, block[0].weight, padding=kernel // 2)  # no bias
    ref = F.relu(F.batch_norm(conv, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                              eps=bn.eps))
    assert block[0].bias is None
    with torch.no_grad():
        out = block(x)
    assert out.shape == (2, 5, 7, 6) and (out == 0).any() and (out > 0).any()
    assert torch.allclose(out, ref, atol=1e-6)


def test_linear_relu_acts_on_every_token_alone():
    torch.manual_seed(0)
    block = linear_relu(4, 6)
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        out = block(x)
        ref = torch.clamp(x @ block[0].weight.T + block[0].bias, min=0)
        assert torch.allclose(out, ref, atol=1e-6) and (out == 0).any() and (out > 0).any()
        assert torch.allclose(block(x[:, 2:3]), out[:, 2:3], atol=1e-6)  # tokens do not mix


def test_dynamic_conv_equals_conv2d_per_sample():
    torch.manual_seed(0)
    B, C, Q, H, W = 3, 4, 5, 9, 7
    feats, weight, bias = torch.randn(B, C, H, W), torch.randn(B, Q, C, 3, 3), torch.randn(B, Q)
    out = dynamic_conv(feats, weight, bias)
    ref = torch.stack([F.conv2d(feats[b:b + 1], weight[b], bias[b], padding=1)[0]
                       for b in range(B)])
    assert out.shape == (B, Q, H, W)
    assert torch.allclose(out, ref, atol=1e-5)
