"""Small layers that several papers share: MLP, coordinate maps, sine position encodings,
attention helpers, a post-norm transformer encoder layer, masked means and token BatchNorm, and
the helpers that keep each image of a padded batch computing as if alone (real patches, border
extension). Anything paper-specific lives in the model file.

Shapes: B batch, C channels, H W feature map, L tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """Linear layers with an activation between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 act: type[nn.Module] = nn.ReLU):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers.append(act())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def coord_map(batch: int, h: int, w: int, device=None, dtype=None) -> Tensor:
    """2-channel map of normalised (x, y) coordinates in [-1, 1]: (B, 2, H, W)."""
    ys = torch.linspace(-1, 1, h, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, w, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).expand(batch, 2, h, w)


def sine_pos_2d(h: int, w: int, dim: int, temperature: float = 10000.0, device=None) -> Tensor:
    """DETR's fixed 2-D sine position encoding, (H*W, dim): half the channels for y, half for x."""
    if dim % 4:
        raise ValueError(f"dim={dim} must be divisible by 4")
    quarter = dim // 4
    freq = temperature ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None] / freq  # (H, dim/4)
    xs = torch.arange(w, device=device, dtype=torch.float32)[:, None] / freq  # (W, dim/4)
    pos_y = torch.cat([ys.sin(), ys.cos()], 1)[:, None, :].expand(h, w, dim // 2)
    pos_x = torch.cat([xs.sin(), xs.cos()], 1)[None, :, :].expand(h, w, dim // 2)
    return torch.cat([pos_y, pos_x], -1).flatten(0, 1)  # (H*W, dim)


def sine_pos_1d(length: int, dim: int, temperature: float = 10000.0, device=None) -> Tensor:
    """Transformer's fixed 1-D sine position encoding, (L, dim)."""
    half = dim // 2
    freq = temperature ** (torch.arange(half, device=device, dtype=torch.float32) / half)
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None] / freq
    return torch.cat([pos.sin(), pos.cos()], 1)


def safe_softmax(logits: Tensor, dim: int) -> Tensor:
    """Softmax where a fully masked slice (all -inf) gives zeros instead of NaN."""
    all_masked = torch.isneginf(logits).all(dim=dim, keepdim=True)
    probs = torch.softmax(logits.masked_fill(all_masked, 0.0), dim=dim)
    return probs.masked_fill(all_masked, 0.0)


def feed_forward(dim: int, hidden: int, dropout: float = 0.0) -> nn.Sequential:
    """The transformer's position-wise FFN (Vaswani et al. 2017): Linear, ReLU, dropout, Linear."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, dim))


class Attention(nn.Module):
    """Standard multi-head attention (Vaswani et al. 2017) on `F.scaled_dot_product_attention`,
    which picks a fused kernel where one applies.

    key_mask (B, M) is True on keys that may be attended to (padded words are False); every
    query must keep at least one key.
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        kv_dim = kv_dim or dim
        self.heads, self.dropout = heads, dropout
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim, dim)
        self.to_v = nn.Linear(kv_dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        B, N, _ = q.shape
        split = lambda x: x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, nh, T, hs)
        q, k, v = split(self.to_q(q)), split(self.to_k(k)), split(self.to_v(v))
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, dim)


class PostNormEncoderLayer(nn.Module):
    """A post-norm transformer encoder layer (Vaswani et al. 2017; DETR's encoder): self-attention
    and the FFN, each followed by dropout, the residual and LayerNorm. x (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn = Attention(dim, heads, dropout=dropout)
        self.ffn = feed_forward(dim, ffn_dim, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.drop(self.attn(x, x, x)))
        return self.norm2(x + self.drop(self.ffn(x)))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of (B, L, C) over the real positions of mask (B, L): (B, C)."""
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


class TokenBatchNorm(nn.Module):
    """BatchNorm over the features of the real tokens of (B, L, C); padding enters neither the
    statistics nor the output (zeros).

    Statistics are computed in fp32 and the output keeps the input's dtype, so the layer runs
    under bf16/fp16 autocast. With `sync = True` (set by `sync_batchnorm`) and a process group
    of more than one process, the statistics cover the tokens of every process, as
    nn.SyncBatchNorm does for images; the gradient flows through the all-reduce.
    """

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.momentum, self.eps = momentum, eps
        self.sync = False

    def _sum(self, x: Tensor) -> Tensor:
        """Sum over this process's tokens, or over every process's when synchronised."""
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.sync and distributed:
            from torch.distributed.nn.functional import all_reduce

            return all_reduce(x)
        return x

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, L, C), mask (B, L) True on real tokens -> (B, L, C) in x's dtype."""
        xf = x.float()
        m = mask[..., None].float()  # (B, L, 1)
        if self.training:
            n = self._sum(m.sum().reshape(1))[0].clamp(min=2)
            mean = self._sum((xf * m).sum((0, 1))) / n  # (C,)
            var = self._sum(((xf - mean) ** 2 * m).sum((0, 1))) / n  # biased, as BatchNorm's
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                unbiased = var * n / (n - 1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        y = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight.float() + self.bias.float()
        return (y * m).to(x.dtype)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Batch statistics over the global batch under DDP: every nn.BatchNorm*d becomes
    nn.SyncBatchNorm and every TokenBatchNorm all-reduces its statistics. Returns the model
    (SyncBatchNorm conversion may replace the top module)."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if isinstance(m, TokenBatchNorm):
            m.sync = True
    return model


# Padded batches (an image padded bottom-right to the batch's size): helpers on the patch grid
# that give every image the result it would have alone.


def real_patches(image_mask: Tensor, patch_size: int, h: int, w: int) -> Tensor:
    """Patches (B, h, w) holding a True pixel of image_mask (B, H, W): for a padded batch, each
    image's real patches (a top-left rectangle); for a binary mask, the patches it touches."""
    real = image_mask[:, None, : h * patch_size, : w * patch_size].float()
    return F.max_pool2d(real, patch_size)[:, 0] > 0


def patch_coord_map(real: Tensor, dtype: torch.dtype) -> Tensor:
    """coord_map per image of a padded batch: (x, y) from -1 to 1 across each image's own real
    patches real (B, h, w), 0 on padding. Returns (B, 2, h, w)."""
    B, h, w = real.shape
    rows, cols = real[:, :, 0].sum(1), real[:, 0, :].sum(1)  # (B,) real patch rows, columns
    ys = torch.arange(h, device=real.device)[None] / (rows[:, None] - 1).clamp(min=1)  # (B, h)
    xs = torch.arange(w, device=real.device)[None] / (cols[:, None] - 1).clamp(min=1)  # (B, w)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), 1) * 2 - 1
    return (grid * real[:, None]).to(dtype)


def extend_border(x: Tensor, real: Tensor) -> Tensor:
    """Copy each image's last real row and column (real (B, h, w)) into its padding: x (B, C, h,
    w). Bilinear upsampling then sees at an image's border what it sees alone (clamping)."""
    B, C, h, w = x.shape
    last_row = (real[:, :, 0].sum(1) - 1).clamp(min=0)[:, None]  # (B, 1)
    last_col = (real[:, 0, :].sum(1) - 1).clamp(min=0)[:, None]
    rows = torch.minimum(torch.arange(h, device=x.device)[None], last_row)  # (B, h)
    cols = torch.minimum(torch.arange(w, device=x.device)[None], last_col)  # (B, w)
    x = x.gather(2, rows[:, None, :, None].expand(B, C, h, w))
    return x.gather(3, cols[:, None, None, :].expand(B, C, h, w))
