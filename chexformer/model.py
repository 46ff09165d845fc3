"""The chexformer hybrid CNN-Transformer classifier.

A DenseNet121 backbone (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017),
usually initialised from CheXNet (Rajpurkar et al., "CheXNet: Radiologist-Level Pneumonia
Detection on Chest X-Rays with Deep Learning", 2017), turns an X-ray into a grid of 1024-channel
features (7x7 at 224 px). Each grid cell becomes a token; a learnable class token and a learnable
positional encoding are added and a pre-norm Transformer encoder (Vaswani et al., 2017;
Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021) mixes them. The head sees the class
token concatenated with the mean of the spatial tokens.

``forward`` returns logits only: (B, 1) for two classes (sigmoid in the loss), (B, C) otherwise.
Attention weights are computed only when asked for (:meth:`ChexFormer.attention_maps`); training
uses the fused ``scaled_dot_product_attention`` kernel.

In: normalised image batches (B, 3, S, S) from :mod:`chexformer.data.datasets` (training) or
:class:`~chexformer.inference.Predictor`, or cached backbone maps (:mod:`chexformer.data.cache`).
Out: logits for the loss (:mod:`chexformer.module`), calibration and explanations. Backbone weights
are loaded by :mod:`chexformer.weights`; checkpoints are rebuilt by :mod:`chexformer.checkpoint`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchvision.models import densenet121

log = logging.getLogger(__name__)

__all__ = ["ChexFormer", "LinearHeadDenseNet", "build_model", "count_parameters", "evaluating", "num_logits",
           "BACKBONE_STAGES"]

BACKBONE_CHANNELS = 1024
BACKBONE_STRIDE = 32

# DenseNet121 ``features`` children grouped into fine-tuning stages, last stage first.
BACKBONE_STAGES: tuple[tuple[str, ...], ...] = (
    ("denseblock4", "norm5"),
    ("transition3", "denseblock3"),
    ("transition2", "denseblock2"),
    ("transition1", "denseblock1"),
    ("conv0", "norm0", "relu0", "pool0"),
)


def num_logits(num_classes: int) -> int:
    """Outputs of the classifier head: two classes share one logit (the positive class's, sigmoid
    in the loss), more classes get one logit each (softmax). Every reader of logits follows this."""
    return 1 if num_classes == 2 else num_classes


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own ``training`` flag.

    Restoring module by module (rather than ``model.train(was_training)``) keeps mixed states
    as they were, e.g. frozen BatchNorm layers in eval mode inside a training model.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with a fused path (training) and an explicit path that also
    returns the per-head attention weights (explanations). Both use the same parameters."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, attn_dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"d_model ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_dropout  # > 0 makes SDPA fall back to its unfused math path
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        drop = self.attn_drop if self.training else 0.0
        weights = None
        if need_weights:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
            weights = attn.float().softmax(dim=-1).to(q.dtype)
            out = F.dropout(weights, drop, self.training) @ v
        elif x.device.type == "cpu" and torch.is_grad_enabled():
            # On CPU the flash kernel's backward is ~10x slower than the math path for short
            # token sequences (50 tokens at 224 px), so training there uses the math backend.
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, d_model)
        return self.proj_drop(self.proj(out)), weights


class EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer: attention and a GELU feed-forward, each residual."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout, attn_dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, weights = self.attn(self.norm1(x), need_weights)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, weights


def _densenet_features() -> nn.Sequential:
    """torchvision DenseNet121's ``features`` (randomly initialised; weights come from weights.py)."""
    return densenet121(weights=None).features


def _set_frozen_stages(backbone: nn.Sequential, freeze_cnn: bool, fine_tune_layers: int) -> list[nn.Module]:
    """Freeze backbone parameters; return the frozen BatchNorm modules (kept in eval mode)."""
    if not freeze_cnn:
        trainable_names = {name for stage in BACKBONE_STAGES for name in stage}
    else:
        trainable_names = {name for stage in BACKBONE_STAGES[:fine_tune_layers] for name in stage}
    frozen_bn: list[nn.Module] = []
    for name, child in backbone.named_children():
        trainable = name in trainable_names
        for p in child.parameters():
            p.requires_grad_(trainable)
        if not trainable:
            frozen_bn.extend(m for m in child.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return frozen_bn


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class _DenseNetBackboneModel(nn.Module):
    """Shared by the models: the DenseNet121 backbone, its freezing and its feature map."""

    backbone: nn.Sequential
    _frozen_bn: list[nn.Module]

    def train(self, mode: bool = True):
        """Like ``nn.Module.train``, but frozen backbone BatchNorm layers always stay in eval mode."""
        super().train(mode)
        for m in self._frozen_bn:
            m.eval()
        return self

    @property
    def backbone_frozen(self) -> bool:
        """True when no backbone parameter trains (the feature-cache path is then exact)."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature map after DenseNet's final ReLU: (B, 1024, H/32, W/32)."""
        return F.relu(self.backbone(x))

    @torch.no_grad()
    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map, (B, 1024, H/32, W/32)."""
        with evaluating(self):
            return self.forward_features(x)


class ChexFormer(_DenseNetBackboneModel):
    """DenseNet121 feature grid -> Transformer encoder with a class token -> classifier.

    Args:
        num_classes: number of classes; two classes give a single logit (positive class).
        img_size: input side the positional encoding is laid out for.
        d_model, num_heads, ffn_dim, num_layers, dropout_rate: encoder shape.
        freeze_cnn, fine_tune_layers: which backbone stages train (see ``BACKBONE_STAGES``).
        attn_dropout: dropout on the attention weights (0 keeps the fused attention kernel in training).
    """

    def __init__(
        self,
        num_classes: int = 2,
        img_size: int = 224,
        d_model: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 512,
        num_layers: int = 2,
        dropout_rate: float = 0.2,
        freeze_cnn: bool = False,
        fine_tune_layers: int = 0,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if img_size % BACKBONE_STRIDE:
            raise ValueError(f"img_size must be a multiple of {BACKBONE_STRIDE}, got {img_size}")
        self.num_classes = num_classes
        self.num_outputs = num_logits(num_classes)
        self.img_size = img_size
        self.grid_size = img_size // BACKBONE_STRIDE

        self.backbone = _densenet_features()
        self.proj = nn.Linear(BACKBONE_CHANNELS, d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size**2, d_model))
        self.pos_drop = nn.Dropout(dropout_rate)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, num_heads, ffn_dim, dropout_rate, attn_dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head_drop = nn.Dropout(dropout_rate)
        self.head = nn.Linear(2 * d_model, self.num_outputs)
        self._init_weights()

        self.freeze_cnn = freeze_cnn
        self.fine_tune_layers = fine_tune_layers
        self._frozen_bn = _set_frozen_stages(self.backbone, freeze_cnn, fine_tune_layers)
        self.train()

    # --- init ---------------------------------------------------------------------------------
    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in [self.proj, self.layers, self.norm, self.head]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    # --- forward pieces ---------------------------------------------------------------------------
    def _pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.grid_size, self.grid_size):
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g = self.grid_size
        grid_pos = grid_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, d_model, g, g)
        grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bicubic", align_corners=False)
        grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, grid_pos], dim=1)

    def tokens_from_features(
        self, feats: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder output for a backbone map, and the per-layer attention if asked for."""
        B, _, h, w = feats.shape
        x = self.proj(feats.flatten(2).transpose(1, 2))  # (B, h*w, d_model)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + h*w, d_model)
        x = self.pos_drop(x + self._pos_embed_for(h, w).to(x.dtype))
        attentions = []
        for layer in self.layers:
            x, weights = layer(x, need_weights)
            if need_weights:
                attentions.append(weights)  # (B, heads, 1 + h*w, 1 + h*w)
        return self.norm(x), attentions

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output for an image batch: (B, 1 + N, d_model)."""
        return self.tokens_from_features(self.forward_features(x))[0]

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        fused = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)  # (B, 2 * d_model)
        return self.head(self.head_drop(fused))

    def forward_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits from a (cached) backbone map; used by the fast frozen-backbone path."""
        return self.forward_head(self.tokens_from_features(feats)[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_features(self.forward_features(x))

    # --- explanations -------------------------------------------------------------------------------
    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer attention weights, each (B, heads, 1 + N, 1 + N); rows sum to 1."""
        with evaluating(self):
            return self.tokens_from_features(self.forward_features(x), need_weights=True)[1]

    def forward_explain(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Logits, per-layer attention and the backbone map in one pass (gradients kept)."""
        feats = self.forward_features(x)
        tokens, attentions = self.tokens_from_features(feats, need_weights=True)
        return self.forward_head(tokens), attentions, feats


class LinearHeadDenseNet(_DenseNetBackboneModel):
    """Baseline for ablations: DenseNet121 features, global average pooling, a linear layer."""

    def __init__(
        self, num_classes: int = 2, dropout_rate: float = 0.2, freeze_cnn: bool = False, fine_tune_layers: int = 0
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_outputs = num_logits(num_classes)
        self.backbone = _densenet_features()
        self.head_drop = nn.Dropout(dropout_rate)
        self.head = nn.Linear(BACKBONE_CHANNELS, self.num_outputs)
        nn.init.zeros_(self.head.bias)
        self._frozen_bn = _set_frozen_stages(self.backbone, freeze_cnn, fine_tune_layers)
        self.train()

    def forward_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(feats.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_features(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def build_model(cfg, num_classes: int = 2, arch: str | None = None) -> nn.Module:
    """Build the model a :class:`~chexformer.config.Config` describes (randomly initialised;
    load backbone weights with :func:`chexformer.weights.load_backbone_weights`)."""
    arch = arch or getattr(cfg, "arch", "hybrid")
    if arch == "hybrid":
        model: nn.Module = ChexFormer(
            num_classes=num_classes,
            img_size=cfg.img_size,
            d_model=cfg.d_model,
            num_heads=cfg.num_heads,
            ffn_dim=cfg.ffn_dim,
            num_layers=cfg.num_layers,
            dropout_rate=cfg.dropout_rate,
            freeze_cnn=cfg.freeze_cnn,
            fine_tune_layers=cfg.fine_tune_layers,
            attn_dropout=cfg.attn_dropout,
        )
    elif arch == "linear":
        model = LinearHeadDenseNet(num_classes, cfg.dropout_rate, cfg.freeze_cnn, cfg.fine_tune_layers)
    else:
        raise ValueError(f"unknown arch {arch!r}: expected 'hybrid' or 'linear'")
    trainable, frozen = count_parameters(model)
    log.info(
        "built %s model: %s classes, %.2fM trainable and %.2fM frozen parameters",
        arch, num_classes, trainable / 1e6, frozen / 1e6,
    )
    return model

