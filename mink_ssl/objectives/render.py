"""Differentiable point splatting: render coloured 3D points into pinhole cameras.

The renderer of CluRender (Mei et al., IJCV 2024, Sec. 5.2, after Wiles et al.'s SynSin), written
as vectorised torch so it runs unchanged on CPU and GPU:

1. each point is moved into the camera frame (``world_to_camera``) and projected with the
   intrinsics to a sub-pixel position ``p_c`` (pixel (u, v) with integer coordinates looks along
   ((u - cx) / fx, (v - cy) / fy, 1), the convention of :func:`mink_ssl.geometry.backproject`);
2. it is splatted onto a disk of ``radius`` pixels with a Gaussian fall-off (paper's G):
   ``rho = exp(-|p_c - l_xy|^2 / (2 nu^2))`` for pixels within the radius, 0 outside;
3. per pixel, the ``k`` splats nearest to the camera (a z-buffer of depth k, by sort + rank
   within each pixel, no loop over pixels) are alpha-composited front to back (eq. 15):
   ``C_xy = sum_i alpha_i c_i prod_{j<i} (1 - alpha_j)`` with ``alpha_i = opacity_i * rho_i^eta``.

Adaptations: the paper's disk test ``|p_c - l|^2 > r`` is read as a radius of ``r`` pixels
(``|p_c - l| <= r``); a per-point ``opacity`` (default 1) multiplies ``rho^eta`` so opacities can
be learned; many images of different cameras are rendered in one call (``image_index`` says
which image each point goes to), so a batch of scenes x views x cameras is one set of tensor ops.
The output is differentiable w.r.t. colours, opacities and point positions (through ``rho``);
the integer pixel assignment and the depth order are piecewise constant.

Memory: O(P * (2 floor(r + 0.5) + 1)^2) splat fragments for P visible points plus
O(images * h * w * k) for the z-buffer; keep frames downscaled (e.g. 60 x 80).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Rendering:
    """images: (I, h, w, C) composited colours (over ``background``, black if none);
    coverage: (I, h, w) accumulated alpha ``1 - prod_k (1 - alpha_k)`` in [0, 1]."""

    images: torch.Tensor
    coverage: torch.Tensor


def project(points: torch.Tensor, world_to_camera: torch.Tensor, intrinsics: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel positions (N, 2) as (u, v) and camera depths z (N,) of world ``points`` (N, 3)
    under per-point cameras ``world_to_camera`` (N, 4, 4) and ``intrinsics`` (N, 3, 3)."""
    cam = torch.einsum("nij,nj->ni", world_to_camera[:, :3, :3], points) + world_to_camera[:, :3, 3]
    z = cam[:, 2]
    xy = cam[:, :2] / z.clamp_min(1e-12)[:, None]  # (N, 2) normalised image coordinates
    uv = torch.einsum("nij,nj->ni", intrinsics[:, :2, :2], xy) + intrinsics[:, :2, 2]
    return uv, z


def _check(points, colors, image_index, world_to_camera, intrinsics, image_size, radius, k, eta,
           opacity, sigma):
    n = len(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got {tuple(points.shape)}")
    if colors.ndim != 2 or len(colors) != n:
        raise ValueError(f"colors must be (N, C) with N = {n} points, got {tuple(colors.shape)}")
    if image_index.shape != (n,) or image_index.is_floating_point():
        raise ValueError(f"image_index must be (N,) integers with N = {n}, got "
                         f"{tuple(image_index.shape)} {image_index.dtype}")
    i = len(world_to_camera)
    if world_to_camera.shape != (i, 4, 4) or intrinsics.shape != (i, 3, 3):
        raise ValueError(f"world_to_camera must be (I, 4, 4) and intrinsics (I, 3, 3) for the "
                         f"same I, got {tuple(world_to_camera.shape)} and "
                         f"{tuple(intrinsics.shape)}")
    if n and (int(image_index.min()) < 0 or int(image_index.max()) >= i):
        raise ValueError(f"image_index spans [{int(image_index.min())}, "
                         f"{int(image_index.max())}] but there are {i} cameras")
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be (h, w) >= 1, got {image_size}")
    if not radius > 0 or not sigma > 0 or not eta > 0:
        raise ValueError(f"radius, sigma and eta must be > 0, got {radius}, {sigma}, {eta}")
    if k < 1:
        raise ValueError(f"k (splats composited per pixel) must be >= 1, got {k}")
    if opacity is not None and opacity.shape != (n,):
        raise ValueError(f"opacity must be (N,) with N = {n}, got {tuple(opacity.shape)}")


def splat_points(points: torch.Tensor, colors: torch.Tensor, image_index: torch.Tensor,
                  world_to_camera: torch.Tensor, intrinsics: torch.Tensor,
                  image_size: tuple[int, int], *, radius: float = 1.25,
                  sigma: float | None = None, k: int = 16, eta: float = 1.0,
                  opacity: torch.Tensor | None = None, near: float = 1e-3,
                  background: torch.Tensor | None = None) -> Rendering:
    """Splat ``points`` into ``I`` images (eqs. 15-16 of CluRender).

    Args:
        points: (N, 3) world coordinates.
        colors: (N, C) per-point colours (or any features).
        image_index: (N,) int64 image each point is rendered into, in ``[0, I)``.
        world_to_camera: (I, 4, 4) per image (the inverse of a camera-to-world pose).
        intrinsics: (I, 3, 3) pinhole matrices at ``image_size``.
        image_size: (h, w) of every image.
        radius: disk radius r in pixels.
        sigma: Gaussian fall-off nu in pixels; ``None``: ``radius / 2``.
        k: splats composited per pixel, nearest to the camera first.
        eta: blending exponent (alpha = opacity * rho^eta).
        opacity: (N,) in [0, 1]; ``None``: 1.
        near: points with camera depth below this (metres) are culled.
        background: (C,) colour behind the points; ``None``: 0.

    Returns:
        :class:`Rendering` with images (I, h, w, C) and coverage (I, h, w).
    """
    sigma = radius / 2 if sigma is None else sigma
    _check(points, colors, image_index, world_to_camera, intrinsics, image_size, radius, k, eta,
           opacity, sigma)
    h, w = (int(v) for v in image_size)
    num_images, c = len(world_to_camera), colors.shape[1]
    device = points.device
    dtype = colors.dtype if colors.is_floating_point() else torch.float32
    image_index = image_index.long()
    uv, z = project(points, world_to_camera[image_index].to(points.dtype),
                    intrinsics[image_index].to(points.dtype))  # (N, 2), (N,)
    reach = math.floor(radius + 0.5)  # farthest pixel offset from the rounded centre
    visible = ((z > near) & (uv[:, 0] > -radius - 0.5) & (uv[:, 0] < w - 0.5 + radius)
               & (uv[:, 1] > -radius - 0.5) & (uv[:, 1] < h - 0.5 + radius))
    idx = visible.nonzero()[:, 0]  # (P,) visible points
    uv, z = uv[idx], z[idx]
    # every visible point against the (2 reach + 1)^2 pixels around its rounded centre
    steps = torch.arange(-reach, reach + 1, device=device)
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")
    px = uv[:, :1].round().long() + dx.reshape(1, -1)  # (P, O) pixel columns
    py = uv[:, 1:].round().long() + dy.reshape(1, -1)  # (P, O) pixel rows
    d2 = (uv[:, :1] - px) ** 2 + (uv[:, 1:] - py) ** 2  # (P, O) squared pixel distance
    inside = (d2 <= radius ** 2) & (px >= 0) & (px < w) & (py >= 0) & (py < h)
    rows, cols = inside.nonzero(as_tuple=True)  # (F,) splat fragments: point row, offset
    point = idx[rows]  # (F,) index into points
    pixel = (image_index[point] * h + py[rows, cols]) * w + px[rows, cols]  # (F,) flat pixel
    depth = z[rows]  # (F,)
    rho = torch.exp(-d2[rows, cols] / (2 * sigma ** 2))  # (F,) Gaussian disk G
    # z-buffer: order fragments by pixel, nearest first, and keep the first k of each pixel
    order = torch.argsort(depth.detach())
    order = order[torch.argsort(pixel[order], stable=True)]
    pixel, point, rho = pixel[order], point[order], rho[order]
    _, counts = torch.unique_consecutive(pixel, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(pixel), device=device) - torch.repeat_interleave(starts, counts)
    keep = rank < k
    pixel, point, rho, rank = pixel[keep], point[keep], rho[keep], rank[keep]
    alpha = rho.to(dtype) ** eta
    if opacity is not None:
        alpha = alpha * opacity[point].to(dtype)
    alpha = alpha.clamp(0.0, 1.0)
    num_pixels = num_images * h * w
    alphas = torch.zeros(num_pixels, k, dtype=dtype, device=device).index_put(
        (pixel, rank), alpha)  # (I h w, k), front to back
    layers = torch.zeros(num_pixels, k, c, dtype=dtype, device=device).index_put(
        (pixel, rank), colors[point].to(dtype))  # (I h w, k, C)
    ones = torch.ones(num_pixels, 1, dtype=dtype, device=device)
    transmittance = torch.cumprod(torch.cat([ones, 1 - alphas[:, :-1]], 1), 1)  # prod_{j<i}
    weights = alphas * transmittance  # (I h w, k)
    images = (weights[:, :, None] * layers).sum(1)  # (I h w, C), eq. 15
    coverage = weights.sum(1)  # (I h w,)
    if background is not None:
        images = images + (1 - coverage)[:, None] * background.to(dtype)
    return Rendering(images.reshape(num_images, h, w, c), coverage.reshape(num_images, h, w))
