"""Qwen2.5-VL's 3-D (M-RoPE) position ids, computed the way transformers' ``get_rope_index`` does.

Text tokens advance all three components (temporal, height, width) together. The ``n = t*h*w``
``<|image_pad|>`` tokens of one image (grid after the 2x2 merge) take position
``start + (t_idx, h_idx, w_idx)``, and the text after the image continues at
``start + max(h, w)``. Padding (``attention_mask == 0``) gets position 0 and is skipped.

Shape legend: ``B`` batch, ``S`` sequence, ``N`` images in the batch (in sample order).
"""

from __future__ import annotations

import torch


def image_token_counts(image_grid_thw_N3: torch.Tensor, spatial_merge_size: int) -> list[int]:
    """``<|image_pad|>`` tokens of each image: t*h*w / merge^2."""
    return (image_grid_thw_N3.prod(-1) // spatial_merge_size**2).tolist()


def _vision_positions(start: int, thw: list[int], merge: int) -> torch.Tensor:
    """[3, t*h'*w'] positions of one image's merged patches, offset by ``start``."""
    t, h, w = thw[0], thw[1] // merge, thw[2] // merge
    grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack(grid, dim=0).reshape(3, -1) + start


def _sample_positions(
    ids_S: torch.Tensor, grids: list[list[int]], image_token_id: int, merge: int
) -> torch.Tensor:
    """[3, S] positions of one unpadded sample; consumes its images' grids in order."""
    is_image = (ids_S == image_token_id).tolist()
    parts: list[torch.Tensor] = []
    pos, i, grid_iter = 0, 0, iter(grids)
    while i < len(is_image):
        j = i
        while j < len(is_image) and is_image[j] == is_image[i]:
            j += 1
        if not is_image[i]:
            parts.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
            continue
        # A run of pad tokens may hold several back-to-back images: take grids until it is full.
        while i < j:
            thw = next(grid_iter)
            vis = _vision_positions(pos, thw, merge)
            parts.append(vis)
            pos += max(thw[1], thw[2]) // merge
            i += vis.shape[1]
        if i != j:
            raise ValueError("image pad tokens do not match the image grids")
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)


def mrope_position_ids(
    input_ids_BS: torch.Tensor,
    image_grid_thw_N3: torch.Tensor | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
    attention_mask_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D position ids of a batch of (possibly text-only) samples.

    Args:
        input_ids_BS: token ids; images appear as runs of ``image_token_id``.
        image_grid_thw_N3: (t, h, w) patch grid of every image of the batch, in sample order;
            None when the batch has no images.
        image_token_id: id of ``<|image_pad|>``.
        spatial_merge_size: the vision tower's patch merge (2 for Qwen2.5-VL).
        attention_mask_BS: 1 for real tokens, 0 for padding (left or right); None: no padding.

    Returns:
        (position_ids_3BS, rope_deltas_B1): the positions, and max position + 1 - length per
        sample (what generation adds to the positions of new tokens).

    Raises:
        ValueError: the image pad tokens of the batch do not match ``image_grid_thw_N3``.
    """
    b, s = input_ids_BS.shape
    grids = [] if image_grid_thw_N3 is None else image_grid_thw_N3.tolist()
    counts = image_token_counts(image_grid_thw_N3, spatial_merge_size) if grids else []
    if int((input_ids_BS == image_token_id).sum()) != sum(counts):
        raise ValueError(
            f"{int((input_ids_BS == image_token_id).sum())} image pad tokens in the batch, "
            f"but the image grids give {sum(counts)}"
        )
    positions_3BS = torch.zeros(3, b, s, dtype=torch.long)
    deltas: list[int] = []
    for row in range(b):
        keep_S = (
            torch.ones(s, dtype=torch.bool)
            if attention_mask_BS is None
            else attention_mask_BS[row].bool().cpu()
        )
        ids_S = input_ids_BS[row].cpu()[keep_S]
        n_images = _images_in(ids_S, counts, image_token_id)
        row_pos = _sample_positions(ids_S, grids[:n_images], image_token_id, spatial_merge_size)
        grids, counts = grids[n_images:], counts[n_images:]
        positions_3BS[:, row, keep_S] = row_pos
        deltas.append((int(row_pos.max()) + 1 if row_pos.numel() else 0) - int(keep_S.sum()))
    device = input_ids_BS.device
    return positions_3BS.to(device), torch.tensor(deltas, device=device).unsqueeze(1)


def _images_in(ids_S: torch.Tensor, counts: list[int], image_token_id: int) -> int:
    """How many of the next images (token ``counts``) the pad tokens of one sample hold."""
    need, n = int((ids_S == image_token_id).sum()), 0
    while need > 0:
        if n >= len(counts):
            raise ValueError("a sample has more image pad tokens than the image grids give")
        need -= counts[n]
        n += 1
    if need:
        raise ValueError("a sample's image pad tokens do not add up to whole images")
    return n
