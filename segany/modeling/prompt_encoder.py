"""SAM's prompt encoder: points (with labels), boxes (two corners) and a low-res mask.

Labels: 1 foreground, 0 background, -1 padding ("not a point"). When points come without a box,
one padding point is appended, as in the official model.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, _dispatch_mode_active, _tracing_or_exporting, weights_generation


def _numpy_ok(*tensors: torch.Tensor) -> bool:
    """Whether a prompt's embedding may be computed in numpy: inference (no autograd), float32 CPU
    tensors, nothing tracing, scripting, exporting or watching the operations. A click's few
    points then take ~10 numpy operations and 4 of PyTorch's (the rounding-sensitive ones, see
    :meth:`PositionEmbeddingRandom.encode_numpy`) where PyTorch ran ~15, each 2-3x slower
    inside a click than alone (its dispatch code cold after the decoder's kernels): a vit_b
    click 0.978-0.989x per round in in-process A/Bs on the development VM (2026-12-06)."""
    return (
        not torch.is_grad_enabled()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not _tracing_or_exporting()
        and not _dispatch_mode_active()
    )


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
        key = (gm.data_ptr(), gm._version, gm.device, gm.dtype, weights_generation())
        if self._dense_pe_cache is None or self._dense_pe_cache[0] != key:
            self._dense_pe_cache = (key, self.pe_layer(self.image_embedding_size).unsqueeze(0))
        return self._dense_pe_cache[1]

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """The official embedding: zeros then ``not_a_point_embed`` where the label is -1, plus
        ``point_embeddings[0]`` / ``[1]`` where it is 0 / 1, nothing for other labels (boxes'
        corners in later SAM versions); the padding point (label -1) is ``not_a_point_embed``.

        The label's embedding is picked from a table (rows -1, 0, 1, other) and added once, where
        the official code adds three masked products: the same values (adding an exact zero
        changes none) in a third of the operations, each ~6 us on a CPU at a click's sizes.
        Labels below -1 (invalid for the predictor, possible through this module) also pick the
        zero row, as the official code adds nothing to them."""
        nap = self.not_a_point_embed.weight
        pe0, pe1 = self.point_embeddings[0].weight, self.point_embeddings[1].weight
        gm = self.pe_layer.positional_encoding_gaussian_matrix
        if _numpy_ok(points, gm, nap, pe0, pe1) and labels.device.type == "cpu" and not labels.is_floating_point():
            return self._embed_points_numpy(points.detach().numpy(), labels.detach().numpy(), pad, nap, pe0, pe1)
        points = points + 0.5
        if pad:
            # The padding point goes through the Fourier features with the others, as in the
            # official code, though its row is replaced: MKL's AVX2 kernels round the rows of
            # that small product differently for another number of rows (seen: 1 float32 step
            # in 2 of 12 rows of a (3, 4, 2) batch, AVX2 emulated on an AVX-512 CPU).
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        pe = self.pe_layer.forward_with_coords(points, self.input_image_size)
        pe = torch.where(labels[..., None] == -1, 0.0, pe)
        table = torch.cat([nap, pe0, pe1, nap.new_zeros(1, nap.shape[1])])
        # rows: -1 -> 0, 0 -> 1, 1 -> 2, anything else -> 3 (-2 and below through the remainder)
        return pe + F.embedding((labels + 1).clamp(-1, 3).remainder(4), table)

    def _embed_points_numpy(self, points: np.ndarray, labels: np.ndarray, pad: bool, nap, pe0, pe1) -> torch.Tensor:
        """:meth:`_embed_points` in numpy (see :func:`_numpy_ok`): the same operations in the same
        float32 steps (the Fourier features: :meth:`PositionEmbeddingRandom.encode_numpy`)."""
        points = points + np.float32(0.5)
        labels = labels.astype(np.int64, copy=False)
        if pad:
            B = points.shape[0]
            points = np.concatenate([points, np.zeros((B, 1, 2), np.float32)], axis=1)
            labels = np.concatenate([labels, np.full((B, 1), -1, np.int64)], axis=1)
        pe = self.pe_layer.encode_numpy(points, self.input_image_size)
        pe[labels == -1] = 0.0
        table = np.concatenate([nap.detach().numpy(), pe0.detach().numpy(), pe1.detach().numpy(), np.zeros((1, nap.shape[1]), np.float32)])
        pe += table[np.remainder(np.clip(labels + 1, -1, 3), 4)]
        return torch.from_numpy(pe)

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        c1, c2 = self.point_embeddings[2].weight, self.point_embeddings[3].weight
        if _numpy_ok(boxes, self.pe_layer.positional_encoding_gaussian_matrix, c1, c2):
            coords = (boxes.detach().numpy() + np.float32(0.5)).reshape(-1, 2, 2)
            corner = self.pe_layer.encode_numpy(coords, self.input_image_size)
            corner += np.stack([c1.detach().numpy()[0], c2.detach().numpy()[0]])
            return torch.from_numpy(corner)
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
        parts = []
        if points is not None:
            coords, labels = points
            parts.append(self._embed_points(coords, labels, pad=(boxes is None)))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        if len(parts) == 1:
            sparse = parts[0]
        elif parts:
            sparse = torch.cat(parts, dim=1)
        else:
            weight = self.point_embeddings[0].weight
            sparse = torch.empty((bs, 0, self.embed_dim), device=weight.device, dtype=weight.dtype)
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
        self._sizes: dict = {}  # (W, H, device) -> that size as a tensor, for forward_with_coords

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords in [0, 1], shape (..., 2) -> (..., 2 * num_pos_feats)."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * np.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def encode_numpy(self, coords: np.ndarray, image_size: Tuple[int, int]) -> np.ndarray:
        """:meth:`forward_with_coords` for float32 (B, N, 2) pixel coordinates in numpy (inference
        only: see ``_numpy_ok``), with the same values to the bit: the elementwise float32 steps
        in numpy (IEEE operations, the same in both), the product with the gaussian matrix and
        the sines and cosines in PyTorch, whose BLAS and vectorised sin/cos round differently
        from numpy's (the official code's values, and a product's rounding may depend on the
        batch shape, which is therefore the official one too)."""
        size_wh = np.array([image_size[1], image_size[0]], dtype=np.float32)
        c = np.float32(2.0) * (coords / size_wh) - np.float32(1.0)
        c = (torch.from_numpy(c) @ self.positional_encoding_gaussian_matrix) * (2 * np.pi)
        return np.concatenate([torch.sin(c).numpy(), torch.cos(c).numpy()], axis=-1)

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
        key = (int(image_size[1]), int(image_size[0]), coords_input.device)
        size_wh = self._sizes.get(key)
        if size_wh is None:  # (a fresh tiny tensor per click costs as much as the division)
            size_wh = self._sizes[key] = torch.tensor(key[:2], device=coords_input.device, dtype=torch.float32)
        return self._pe_encoding((coords_input / size_wh).to(torch.float))
