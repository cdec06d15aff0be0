"""Local, translation-equivariant networks: UNet2D, ResNet and PatchMLP (paper App. C.2);
and two that are not, as practitioners write them: DnCNN and the strided U-Net.

Each network maps a pre-inverted measurement ``v = B y`` ``(n, C, H, W)`` and the noise
level σ (a float or an ``(n,)`` tensor) to an image ``(n, C, H, W)``:
``out[m]`` depends on ``v`` only through the ``p × p`` circular patch ``Π_m v``
(receptive field exactly ``p``), and ``net(T_g v) = T_g net(v)`` for every circular shift
``g`` (Thm. 3.8's class F). Three ingredients make this exact:

- every convolution is circular (``padding_mode="circular"``) and has stride 1: strided
  downsampling is only equivariant to even shifts, so the UNet2D keeps the full resolution;
- the kernel sizes are chosen so that the radii ``(k - 1) / 2`` along the longest path add
  up to ``(p - 1) / 2``; all other layers act per pixel (1 × 1);
- normalisation never mixes pixels at inference: BatchNorm (its running statistics are a
  per-channel affine map in eval mode; in train mode it mixes the batch, which is fine for
  training) or LayerNorm over the channels of one pixel. No GroupNorm over the image.

σ enters through a sine-cosine embedding followed by a small MLP, projected and added in
every block (FiLM-free, as in diffusers' ``UNet2DModel`` time embedding). With
``precondition=True`` (default) the body is wrapped as in EDM (Karras et al., 2022):
``out = ½ + c_skip(σ) (v - ½) + c_out(σ) F(c_in(σ) (v - ½), σ)`` with
``c_skip = s²/(σ² + s²)``, ``c_out = σ s / √(σ² + s²)``, ``c_in = 1/√(σ² + s²)``
(σ here is the noise level of the input, ``σ · noise_gain`` for ``v = B y``),
``s = 0.5``: a per-pixel, σ-dependent affine map, so locality and equivariance are kept and
the class of functions is the same; it only makes the body's input and target have unit
scale at every σ, which speeds up training.

Entry point: :func:`build` with a size preset (``tiny`` trains in about a minute on a
laptop CPU, ``small``, ``paper`` ≈ 4M parameters as in the paper's Table 3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_bool, check_int, check_noise_levels, check_real, check_tensor
from .patches import check_patch_size

#: The local, translation-equivariant networks (Thm. 3.8's class F).
LOCAL_NETS = ("unet", "resnet", "patchmlp")
#: Networks that break the assumptions as practitioners' networks do (zero padding, strides):
#: ``dncnn`` and ``stridedunet`` (the UNet2D with diffusers' strided down- and upsampling
#: and zero padding, i.e. before the paper's modifications). Not local nor equivariant.
OTHER_NETS = ("dncnn", "stridedunet")
NETS = LOCAL_NETS + OTHER_NETS
PRESETS = ("tiny", "small", "paper")
PATCH_SIZES = (5, 7, 9, 11)
SIGMA_DATA = 0.5

# Hyper-parameters per architecture and preset (patch size 5, 1 channel: tests/test_nets.py
# checks the parameter counts; the paper preset is about 4M as in the paper's Table 3).
_PRESETS = {
    "unet": {
        "tiny": {"block_out_channels": (16, 32), "layers_per_block": 1},
        "small": {"block_out_channels": (32, 64, 96), "layers_per_block": 1},
        "paper": {"block_out_channels": (96, 224, 480), "layers_per_block": 1},
    },
    "resnet": {
        "tiny": {"width": 32, "blocks": 3},
        "small": {"width": 96, "blocks": 3},
        "paper": {"width": 512, "blocks": 3},
    },
    "dncnn": {"tiny": {"width": 32}, "small": {"width": 48}, "paper": {"width": 64}},
    "stridedunet": {
        "tiny": {"block_out_channels": (16, 32), "layers_per_block": 1},
        "small": {"block_out_channels": (32, 64, 96), "layers_per_block": 1},
        "paper": {"block_out_channels": (96, 224, 480), "layers_per_block": 1},
    },
    "patchmlp": {
        "tiny": {"width": 48, "hidden": 96, "blocks": 3},
        "small": {"width": 128, "hidden": 256, "blocks": 5},
        "paper": {"width": 320, "hidden": 1280, "blocks": 5},
    },
}


def preset(name: str, size: str = "tiny") -> dict:
    """The hyper-parameters of architecture ``name`` for preset ``size`` (a copy)."""
    name, size = _check_name(name), _check_preset(size)
    return dict(_PRESETS[name][size])


def _check_name(name) -> str:
    if name not in NETS:
        raise ValueError(f"name must be one of {NETS}, got {name!r}")
    return name


def _check_preset(size) -> str:
    if size not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {size!r}")
    return size


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def receptive_window(i: int, j: int, p: int, size: int) -> torch.Tensor:
    """Boolean ``(size, size)`` mask of the circular ``p × p`` window centred at (i, j)."""
    rows = torch.arange(i - p // 2, i + p // 2 + 1) % size
    cols = torch.arange(j - p // 2, j + p // 2 + 1) % size
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[rows[:, None], cols[None, :]] = True
    return mask


def input_gradient(net: nn.Module, i: int, j: int, size: int, channels: int = 1, seed=1):
    """``|∂ net(v, σ)[:, :, i, j] / ∂v|`` summed over three random float64 inputs
    ``(3, channels, size, size)`` (σ = 0.05, 0.4, 1) and the channels: ``(size, size)``;
    non-zero exactly on the receptive field of pixel (i, j)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.rand(3, channels, size, size, generator=gen, dtype=torch.float64)
    v.requires_grad_(True)
    out = net(v, torch.tensor([0.05, 0.4, 1.0], dtype=torch.float64))
    (grad,) = torch.autograd.grad(out[:, :, i, j].sum(), v)
    return grad.abs().sum(dim=(0, 1))


# ----------------------------------------------------------------------------- pieces


def sigma_embedding(sigma: torch.Tensor, dim: int, max_freq: float = 200.0) -> torch.Tensor:
    """Sine-cosine embedding ``(n, dim)`` of noise levels ``sigma (n,)``.

    Frequencies are geometric from 1 to ``max_freq`` rad per unit of σ, so that σ in
    ``[0, 1]`` is resolved from coarse to about ``1 / max_freq``.
    """
    half = dim // 2
    freqs = torch.exp(
        torch.linspace(0.0, math.log(max_freq), half, device=sigma.device, dtype=sigma.dtype)
    )
    args = sigma[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


class SigmaEmbedding(nn.Module):
    """σ -> sine-cosine features -> Linear -> SiLU -> Linear, ``(n, dim)``."""

    def __init__(self, features: int, dim: int):
        super().__init__()
        self.features = features
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.mlp(sigma_embedding(sigma, self.features))


def _conv(c_in: int, c_out: int, k: int, bias: bool = True, padding: str = "circular"):
    """Stride-1 'same' convolution, circular (``padding="zeros"``: zero-padded, as most
    practitioners' networks); 1 × 1: no padding, hence no copy."""
    if k == 1:
        return nn.Conv2d(c_in, c_out, 1, bias=bias)
    return nn.Conv2d(c_in, c_out, k, padding=k // 2, padding_mode=padding, bias=bias)


class LocalDenoiser(nn.Module):
    """Base class: σ handling and the (optional) EDM preconditioning around ``body``.

    Subclasses set ``self.patch_size`` and ``self.channels`` and implement
    ``body(h, sigma)`` on the scaled input ``h (n, C, H, W)``.
    """

    patch_size: int
    channels: int
    precondition: bool

    def __init__(self):
        super().__init__()
        # RMS gain of the noise through the pre-inverse B (1 for B = I): the
        # preconditioning uses the noise level sigma * noise_gain of its input v = B y.
        self.register_buffer("noise_gain", torch.ones(()))

    def body(self, h: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sigma(self, v: torch.Tensor, sigma) -> torch.Tensor:
        """σ as an ``(n,)`` tensor; noise levels must be finite and >= 0."""
        n = v.shape[0]
        if isinstance(sigma, torch.Tensor):
            check_noise_levels(sigma)  # one reduction
        else:
            sigma = check_real(sigma, "sigma", 0)
        sigma = torch.as_tensor(sigma, dtype=v.dtype, device=v.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(n)
        if sigma.shape != (n,):
            raise ValueError(
                f"sigma must be a float or a tensor of shape ({n},), got shape {tuple(sigma.shape)}"
            )
        return sigma

    def forward(self, v: torch.Tensor, sigma) -> torch.Tensor:
        check_tensor(v, "v")
        if not v.is_floating_point():
            raise TypeError(f"v must be a real floating-point tensor, got {v.dtype}")
        if v.ndim != 4 or v.shape[1] != self.channels:
            raise ValueError(f"v must have shape (n, {self.channels}, H, W), got {tuple(v.shape)}")
        sigma = self._sigma(v, sigma)
        if not self.precondition:
            return self.body(v, sigma)
        s2, level = SIGMA_DATA**2, sigma * self.noise_gain
        scale = (level**2 + s2).rsqrt()[:, None, None, None]
        c_skip = s2 * scale**2
        c_out = level[:, None, None, None] * SIGMA_DATA * scale
        centred = v - 0.5
        return 0.5 + c_skip * centred + c_out * self.body(centred * scale, sigma)


# ----------------------------------------------------------------------------- UNet2D


class _ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` at full resolution: norm, SiLU, conv k×k (+ σ), norm,
    SiLU, conv 1×1, plus a (1×1 if needed) shortcut."""

    def __init__(self, c_in: int, c_out: int, k: int, emb_dim: int, norm: str, padding: str):
        super().__init__()
        self.norm1 = _norm2d(norm, c_in)
        self.conv1 = _conv(c_in, c_out, k, padding=padding)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = _norm2d(norm, c_out)
        self.conv2 = _conv(c_out, c_out, 1)
        self.shortcut = _conv(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each pixel of ``(n, C, H, W)`` (local)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norm2d(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "layer":
        return _ChannelLayerNorm(channels)
    raise ValueError(f"norm must be 'batch' or 'layer', got {norm!r}")


def _radii(total: int, slots: int) -> list[int]:
    """Spread a receptive-field radius ``total`` over ``slots`` layers in order: 1 each
    (3 × 3 kernels) and the remainder on the first slot; the later slots get 0 (1 × 1)."""
    radii = [1 if i < total else 0 for i in range(slots)]
    radii[0] += max(0, total - slots)
    return radii


class UNet2D(LocalDenoiser):
    """A diffusers-style ``UNet2DModel`` whose receptive field is exactly ``p × p``.

    Departure from diffusers (and from the usual U-Net): there is no downsampling or
    upsampling. A strided convolution is equivariant only to shifts by multiples of its
    stride, so every block runs at full resolution with circular padding, and the "U" is the
    channel widths ``block_out_channels`` going up and back down, with diffusers' skip
    connections (each down-block output is concatenated to the input of an up block). To fix
    the receptive field, the ``(p - 1) / 2`` unit radii are given as 3 × 3 kernels to the
    first layers of the main path, in order ``conv_in``, the down blocks (the first
    convolution of each ResNet block), the mid block, the up blocks, ``conv_out``; every
    other convolution is 1 × 1. The main path crosses all of them, so the field is exactly
    ``p``. For p = 5 these are ``conv_in`` and the first down block, so that the deep 1 × 1
    layers see the whole patch. (The paper's code puts them at ``conv_in`` and
    ``conv_out``; then the last layer only combines, linearly, nonlinear features of 3 × 3
    patches, which limits what the network can represent: measured here, the tiny preset's
    agreement with the LE-MMSE then levelled off at about 26 dB.) σ: sine-cosine embedding,
    two linear layers, a linear projection added in every ResNet block.

    ``strided=True`` undoes both modifications, as in diffusers: zero padding, a 3 × 3
    stride-2 convolution after every level but the last, nearest upsampling and a 3 × 3
    convolution where the up path meets a finer skip. The field then exceeds ``p`` and
    depends on the pixel's parity; only even shifts commute with it, and not at the
    boundary (``nets.build("stridedunet", p)``).
    """

    def __init__(
        self,
        patch_size: int = 5,
        channels: int = 1,
        block_out_channels=(16, 32),
        layers_per_block: int = 1,
        norm: str = "batch",
        precondition: bool = True,
        strided: bool = False,
    ):
        super().__init__()
        self.patch_size = patch_size = check_patch_size(patch_size, low=3)
        self.channels = channels = check_int(channels, "channels", low=1)
        self.precondition = check_bool(precondition, "precondition")
        self.strided = check_bool(strided, "strided")
        pad = "zeros" if strided else "circular"
        widths = tuple(check_int(c, "block_out_channels entry", low=1) for c in block_out_channels)
        if not widths:
            raise ValueError("block_out_channels must hold at least one width")
        layers_per_block = check_int(layers_per_block, "layers_per_block", low=1)
        c0, levels = widths[0], len(widths)
        emb_dim = 4 * c0
        self.embedding = SigmaEmbedding(c0, emb_dim)
        n_down = levels * layers_per_block
        # slots in the order of the main path: conv_in, down blocks, mid, up blocks (one
        # more than down), conv_out
        kernels = [2 * r + 1 for r in _radii((patch_size - 1) // 2, 2 * n_down + 4)]
        k_in, k_down, k_mid = kernels[0], kernels[1 : n_down + 1], kernels[n_down + 1]
        k_up, k_out = kernels[n_down + 2 : -1], kernels[-1]
        self.conv_in = _conv(channels, c0, k_in, padding=pad)
        self.down = nn.ModuleList()
        skips, c = [c0], c0
        for i, width in enumerate(widths):
            for j in range(layers_per_block):
                k = k_down[i * layers_per_block + j]
                self.down.append(_ResnetBlock(c, width, k, emb_dim, norm, pad))
                c = width
                skips.append(c)
        self.mid = _ResnetBlock(c, c, k_mid, emb_dim, norm, pad)
        self.up = nn.ModuleList()
        ku = iter(k_up)
        for i, width in enumerate(reversed(widths)):
            for _ in range(layers_per_block + (1 if i == 0 else 0)):
                block = _ResnetBlock(c + skips.pop(), width, next(ku), emb_dim, norm, pad)
                self.up.append(block)
                c = width
        self.norm_out = _norm2d(norm, c)
        self.conv_out = _conv(c, channels, k_out, padding=pad)
        # strided: diffusers' Downsample2D after every level but the last, Upsample2D
        # (nearest, then a 3 × 3 convolution) where the up path meets a finer skip
        level_ends = [(i + 1) * layers_per_block for i in range(levels - 1)]
        self.downsample = nn.ModuleDict(
            {
                str(i): nn.Conv2d(
                    widths[i // layers_per_block - 1], widths[i // layers_per_block - 1], 3, 2, 1
                )
                for i in level_ends
            }
            if strided
            else {}
        )
        self.upsample = (
            nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for width in reversed(widths[1:]))
            if strided
            else nn.ModuleList()
        )

    def body(self, h, sigma):
        emb = self.embedding(sigma)
        h = self.conv_in(h)
        skips = [h]
        for i, block in enumerate(self.down, 1):
            h = block(h, emb)
            skips.append(h)
            if str(i) in self.downsample:
                h = self.downsample[str(i)](h)
        h = self.mid(h, emb)
        up = iter(self.upsample)
        for block in self.up:
            skip = skips.pop()
            if skip.shape[-1] != h.shape[-1]:
                h = next(up)(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- ResNet


class _ResBlock(nn.Module):
    """``x + ReLU(BN(conv(x + emb)))`` (the minimal ResNet block of Kamb & Ganguli)."""

    def __init__(self, width: int, k: int, emb_dim: int):
        super().__init__()
        self.emb = nn.Linear(emb_dim, width)
        self.conv = _conv(width, width, k, bias=False)
        self.norm = nn.BatchNorm2d(width)

    def forward(self, x, emb):
        return x + F.relu(self.norm(self.conv(x + self.emb(emb)[:, :, None, None])))


class ResNet(LocalDenoiser):
    """Minimal ResNet: conv in, residual blocks (conv + BatchNorm + ReLU), conv out 1 × 1.

    The ``(p - 1) / 2`` unit radii go to ``conv_in`` (3 × 3) and to the first blocks
    (3 × 3); when there are fewer blocks than radii, ``conv_in`` takes the rest (a larger
    kernel). The remaining blocks are 1 × 1. σ: sine-cosine embedding and two linear
    layers, projected and added to the input of every block.
    """

    def __init__(
        self,
        patch_size: int = 5,
        channels: int = 1,
        width: int = 32,
        blocks: int = 3,
        precondition: bool = True,
    ):
        super().__init__()
        self.patch_size = patch_size = check_patch_size(patch_size, low=3)
        self.channels = channels = check_int(channels, "channels", low=1)
        self.precondition = check_bool(precondition, "precondition")
        width, blocks = check_int(width, "width", low=1), check_int(blocks, "blocks", low=0)
        radii = _radii((patch_size - 1) // 2, 1 + blocks)
        emb_dim = width
        self.embedding = SigmaEmbedding(width, emb_dim)
        self.conv_in = _conv(channels, width, 2 * radii[0] + 1)
        self.blocks = nn.ModuleList(_ResBlock(width, 2 * r + 1, emb_dim) for r in radii[1:])
        self.conv_out = _conv(width, channels, 1)

    def body(self, h, sigma):
        emb = F.silu(self.embedding(sigma))
        h = self.conv_in(h)
        for block in self.blocks:
            h = block(h, emb)
        return self.conv_out(h)


# ---------------------------------------------------------------------------- PatchMLP


class _MLPBlock(nn.Module):
    """Pre-norm residual MLP block on per-pixel features ``(n, H, W, width)``:
    ``x + Linear(GELU(Linear(LayerNorm(x) + emb)))``."""

    def __init__(self, width: int, hidden: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x, emb):
        h = self.norm(x) + self.emb(emb)[:, None, None, :]
        return x + self.fc2(F.gelu(self.fc1(h)))


class PatchMLP(LocalDenoiser):
    """An MLP on the ``p × p`` circular patch around each pixel.

    The first layer is a linear map of the flattened patch ``Π_m v`` (``C p²`` values),
    implemented as a ``p × p`` circular convolution (the same map as ``unfold`` followed by
    a linear layer); then ``blocks`` residual MLP blocks (two linear layers, LayerNorm,
    GELU) act on each pixel's features, and a final LayerNorm and linear layer give the
    ``C`` output values of the pixel. σ: sine-cosine embedding and two linear layers,
    projected and added in every block.
    """

    def __init__(
        self,
        patch_size: int = 5,
        channels: int = 1,
        width: int = 48,
        hidden: int = 96,
        blocks: int = 3,
        precondition: bool = True,
    ):
        super().__init__()
        self.patch_size = patch_size = check_patch_size(patch_size, low=3)
        self.channels = channels = check_int(channels, "channels", low=1)
        self.precondition = check_bool(precondition, "precondition")
        width, hidden = check_int(width, "width", low=1), check_int(hidden, "hidden", low=1)
        blocks = check_int(blocks, "blocks", low=0)
        emb_dim = width
        self.embedding = SigmaEmbedding(width, emb_dim)
        self.patch = _conv(channels, width, patch_size)
        self.blocks = nn.ModuleList(_MLPBlock(width, hidden, emb_dim) for _ in range(blocks))
        self.norm_out = nn.LayerNorm(width)
        self.head = nn.Linear(width, channels)

    def body(self, h, sigma):
        emb = F.silu(self.embedding(sigma))
        x = self.patch(h).permute(0, 2, 3, 1)  # (n, H, W, width)
        for block in self.blocks:
            x = block(x, emb)
        return self.head(self.norm_out(x)).permute(0, 3, 1, 2)


# ------------------------------------------------------- networks the book did not design


class _DnCNNLayer(nn.Module):
    """``ReLU(BN(conv 3 × 3(x + emb)))``, zero-padded (DnCNN's middle layer, plus σ)."""

    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.emb = nn.Linear(emb_dim, width)
        self.conv = _conv(width, width, 3, bias=False, padding="zeros")
        self.norm = nn.BatchNorm2d(width)

    def forward(self, x, emb):
        return F.relu(self.norm(self.conv(x + self.emb(emb)[:, :, None, None])))


class DnCNN(LocalDenoiser):
    """DnCNN (Zhang et al., 2017) as practitioners write it: ``(p - 1) / 2`` zero-padded
    3 × 3 convolutions (conv + ReLU, then conv + BatchNorm + ReLU, then conv), so its field
    is ``p`` in the interior only, and it is not translation-equivariant near the boundary
    (a case of the book's explain chapter, not of Thm. 3.8's class). σ enters as in
    :class:`ResNet`; with the same EDM wrapper, the body predicts the scaled residual."""

    def __init__(
        self,
        patch_size: int = 11,
        channels: int = 1,
        width: int = 32,
        precondition: bool = True,
    ):
        super().__init__()
        self.channels = channels = check_int(channels, "channels", low=1)
        self.patch_size = patch_size = check_patch_size(patch_size, low=5)  # 2 layers
        self.precondition = check_bool(precondition, "precondition")
        width = check_int(width, "width", low=1)
        self.embedding = SigmaEmbedding(width, width)
        self.conv_in = _conv(channels, width, 3, padding="zeros")
        depth = (patch_size - 1) // 2
        self.layers = nn.ModuleList(_DnCNNLayer(width, width) for _ in range(depth - 2))
        self.conv_out = _conv(width, channels, 3, padding="zeros")

    def body(self, h, sigma):
        emb = F.silu(self.embedding(sigma))
        h = F.relu(self.conv_in(h))
        for layer in self.layers:
            h = layer(h, emb)
        return self.conv_out(h)


def _strided_unet(**kwargs) -> UNet2D:
    return UNet2D(strided=True, **kwargs)


# ------------------------------------------------------------------------------- build

_CLASSES = {
    "unet": UNet2D,
    "resnet": ResNet,
    "patchmlp": PatchMLP,
    "dncnn": DnCNN,
    "stridedunet": _strided_unet,
}


def build(
    name: str, patch_size: int = 5, channels: int = 1, preset: str = "tiny", **overrides
) -> LocalDenoiser:
    """A local, translation-equivariant network, called as ``net(v, sigma)``.

    Args:
        name: ``"unet"``, ``"resnet"`` or ``"patchmlp"`` (:data:`LOCAL_NETS`), or
            ``"dncnn"``, ``"stridedunet"`` (:data:`OTHER_NETS`: ``p`` is then the field
            of the convolutions at full resolution, not a guarantee).
        patch_size: receptive field ``p`` (odd; the paper uses 5, 7, 9, 11).
        channels: image channels ``C`` (input and output).
        preset: ``"tiny"``, ``"small"`` or ``"paper"`` (see ``_PRESETS``).
        overrides: replace preset hyper-parameters (e.g. ``width=64``,
            ``precondition=False``).
    """
    name = _check_name(name)
    kwargs = {**_PRESETS[name][_check_preset(preset)], **overrides}
    return _CLASSES[name](patch_size=patch_size, channels=channels, **kwargs)
