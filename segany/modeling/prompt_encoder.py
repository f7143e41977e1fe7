"""SAM's prompt encoder: points (with labels), boxes (two corners) and a low-res mask.

Labels: 1 foreground, 0 background, -1 padding ("not a point"). When points come without a box,
one padding point is appended, as in the official model.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type

import numpy as np
import torch
from torch import nn

from .common import LayerNorm2d


class PromptEncoder(nn.Module):
    """Embeds prompts into sparse (B, N, D) tokens and a dense (B, D, h, w) map."""

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Tuple[int, int],
        input_image_size: Tuple[int, int],
        mask_in_chans: int,
        activation: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.num_point_embeddings = 4  # negative point, positive point, box corner 1, box corner 2
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        self._dense_pe_cache: Optional[tuple] = None

    def get_dense_pe(self) -> torch.Tensor:
        """(1, D, h, w) positional encoding of the image-embedding grid.

        It depends only on the (frozen) gaussian matrix, so it is computed once and recomputed only
        when that buffer is replaced, moved or written.
        """
        gm = self.pe_layer.positional_encoding_gaussian_matrix
        if gm.is_inference():  # made under torch.inference_mode: no version counter to key on
            return self.pe_layer(self.image_embedding_size).unsqueeze(0)
        key = (gm.data_ptr(), gm._version, gm.device, gm.dtype)
        if self._dense_pe_cache is None or self._dense_pe_cache[0] != key:
            self._dense_pe_cache = (key, self.pe_layer(self.image_embedding_size).unsqueeze(0))
        return self._dense_pe_cache[1]

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # centre of the pixel
        if pad:
            padding_point = torch.zeros((points.shape[0], 1, 2), device=points.device, dtype=points.dtype)
            padding_label = -torch.ones((labels.shape[0], 1), device=labels.device, dtype=labels.dtype)
            points = torch.cat([points, padding_point], dim=1)
            labels = torch.cat([labels, padding_label], dim=1)
        pe = self.pe_layer.forward_with_coords(points, self.input_image_size)
        # Where-based rather than in-place masked writes so that autograd works in training.
        lab = labels[..., None]
        pe = torch.where(lab == -1, torch.zeros_like(pe), pe)
        pe = pe + (lab == -1) * self.not_a_point_embed.weight
        pe = pe + (lab == 0) * self.point_embeddings[0].weight
        pe = pe + (lab == 1) * self.point_embeddings[1].weight
        return pe

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        boxes = boxes + 0.5
        coords = boxes.reshape(-1, 2, 2)
        corner = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        corner_emb = torch.stack(
            [self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]], dim=0
        )
        return corner + corner_emb

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        return self.mask_downscaling(masks)

    @staticmethod
    def _get_batch_size(points, boxes, masks) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def _get_device(self) -> torch.device:
        return self.point_embeddings[0].weight.device

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """points: ((B, N, 2) xy in input-frame pixels, (B, N) labels); boxes: (B, 4) xyxy;
        masks: (B, 1, 4h, 4w) logits. Returns sparse (B, N', D) and dense (B, D, h, w)."""
        bs = self._get_batch_size(points, boxes, masks)
        weight = self.point_embeddings[0].weight
        sparse = torch.empty((bs, 0, self.embed_dim), device=weight.device, dtype=weight.dtype)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=(boxes is None))], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                bs, -1, self.image_embedding_size[0], self.image_embedding_size[1]
            )
        return sparse, dense


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (Tancik et al.)."""

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords in [0, 1], shape (..., 2) -> (..., 2 * num_pos_feats)."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * np.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: Tuple[int, int]) -> torch.Tensor:
        """(C, h, w) encoding of the centres of an h x w grid."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((h, w), device=device, dtype=torch.float32)
        y_embed = (grid.cumsum(dim=0) - 0.5) / h
        x_embed = (grid.cumsum(dim=1) - 0.5) / w
        pe = self._pe_encoding(torch.stack([x_embed, y_embed], dim=-1))
        return pe.permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """(B, N, 2) pixel coordinates in an image of (H, W) -> (B, N, C)."""
        size_wh = torch.tensor([image_size[1], image_size[0]], device=coords_input.device)
        return self._pe_encoding((coords_input / size_wh).to(torch.float))
