"""Point-set sampling and grouping for VoteNet-style heads: farthest point sampling (FPS) and
ball query, as in PointNet++ (Qi et al. 2017) and VoteNet (Qi et al. 2019), in plain torch.

PointNet++ and VoteNet ship these as CUDA kernels; here they are vectorised torch, so the same
code runs on CPU and GPU without a compiled extension of ours:

- FPS keeps, per scene, the squared distance of every point to the nearest selected point and
  picks the farthest one, ``num`` times. The loop over the ``num`` samples is inherent to the
  greedy algorithm; each step is a few tensor operations over all points of all scenes at once.
  The first sample is point 0 of every scene (the PointNet++/VoteNet kernels' deterministic
  start) or, given a ``torch.Generator``, a uniformly random point of each scene. Ties go to the
  lowest index (``argmax``'s first maximum). Unlike the CUDA kernel, a selected point is never
  selected again, so duplicated points cannot make a sample repeat: indices are distinct.
- Ball query returns, for every centre, the first ``k`` points (in index order) whose squared
  distance is strictly below ``radius**2`` (the kernel's ``d2 < radius2``), padded to ``k`` by
  repeating the first index found, as PointNet++ does. Where the kernel leaves an empty ball
  filled with index 0 (a real point that is not in the ball), here the row is ``-1`` and its
  count 0, so an empty ball is visible (mask rows with ``count == 0`` before gathering: torch
  indexing would read ``-1`` as the last row). Scenes are visited one by one and their centres
  in chunks, so at most ``chunk_elems`` centre-point distances are held at a time.

Ties are exact only when distances are: on a voxel grid, pass integer-valued (voxel-unit)
coordinates to get the lowest-index rule; in metres, rounding decides between tied points.
FPS and ball query compute squared distances the same way, one coordinate at a time.

Both accept a padded batch ``(B, N, D)`` or packed rows ``(N, D)`` with a per-row scene index
(the layout of ``mink_ssl.data.batch`` and of ``SparseTensor.C[:, 0]``); packed inputs are
padded internally and the results index rows of the packed tensor.

fpsample (C++ FPS for CPU) was measured and not used. The last wheel for Python 3.11 is 0.3.3
(the current 1.0.2 is a source distribution that compiles C++ at install). On one thread, for
20,000 points to 2,048 samples, its exact ``fps_sampling`` is only 1.5-2x faster than this
code (same indices). Its fast ``bucket_fps_kdline_sampling`` (about 30x faster) does not honour
``start_idx`` (asked to start at point 0 it started at another point, which indexes its
internal kd-tree order) and breaks grid ties differently, so it is not the reference FPS. It
is CPU-only and float32-only, so results would also differ between devices and dtypes.
"""
from __future__ import annotations

import torch

_CHUNK_ELEMS = 1 << 21  # centre-point distances held at once by ball_query (~8 MB in float32)


def _check_points(points, name: str) -> torch.Tensor:
    if not isinstance(points, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(points).__name__}")
    if points.ndim not in (2, 3) or points.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (B, N, D) or (N, D) with a batch index, got "
                         f"shape {tuple(points.shape)}")
    if not points.is_floating_point():
        raise ValueError(f"{name} must be floating point coordinates, got dtype {points.dtype}")
    return points


def _check_batch_index(batch_index, n: int, device: torch.device, name: str,
                       num_scenes: int | None) -> tuple[torch.Tensor, int]:
    """``batch_index`` as (n,) int64 on ``device`` and the number of scenes B."""
    if batch_index is None:
        zeros = torch.zeros(n, dtype=torch.long, device=device)
        return zeros, 1 if num_scenes is None else num_scenes
    if not isinstance(batch_index, torch.Tensor) or batch_index.is_floating_point() \
            or batch_index.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of scene indices, got "
                         f"{getattr(batch_index, 'dtype', type(batch_index).__name__)}")
    if batch_index.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one scene index per row), got "
                         f"{tuple(batch_index.shape)}")
    batch_index = batch_index.to(device=device, dtype=torch.long)
    lo = int(batch_index.min()) if n else 0
    hi = int(batch_index.max()) if n else -1
    if lo < 0:
        raise ValueError(f"{name} must be >= 0, got minimum {lo}")
    if num_scenes is None:
        num_scenes = hi + 1
    elif hi >= num_scenes:
        raise ValueError(f"{name} has scene {hi} but num_scenes={num_scenes}; pass "
                         f"num_scenes >= {hi + 1}")
    return batch_index, num_scenes


def pad_by_scene(points: torch.Tensor, batch_index: torch.Tensor, num_scenes: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed rows to a padded batch, keeping each scene's rows in their original order.

    Args:
        points: (N, D) rows of all scenes.
        batch_index: (N,) int64 scene of each row, in ``[0, num_scenes)``.

    Returns:
        padded (B, S, D) with S the largest scene (zeros in padding), rows (B, S) int64 the packed
        row of every padded slot (-1 in padding), counts (B,) int64 rows per scene.
    """
    n, d = points.shape
    counts = torch.bincount(batch_index, minlength=num_scenes)  # (B,)
    order = torch.sort(batch_index, stable=True).indices  # (N,) rows grouped by scene
    scene = batch_index[order]
    slot = torch.arange(n, device=points.device) - (counts.cumsum(0) - counts)[scene]  # (N,)
    width = int(counts.max()) if num_scenes else 0
    padded = points.new_zeros(num_scenes, width, d)
    padded[scene, slot] = points[order]
    rows = torch.full((num_scenes, width), -1, dtype=torch.long, device=points.device)
    rows[scene, slot] = order
    return padded, rows, counts


def _fps_padded(x: torch.Tensor, counts: torch.Tensor, num: int, start: torch.Tensor
                ) -> torch.Tensor:
    """FPS on a padded batch x (B, S, D) with counts (B,) real points each; (B, num) slots."""
    b, s, d = x.shape
    planes = x.permute(2, 0, 1).contiguous()  # (D, B, S): one contiguous plane per coordinate
    scenes = torch.arange(b, device=x.device)
    dist = torch.full((b, s), float("inf"), dtype=x.dtype, device=x.device)  # (B, S)
    dist[torch.arange(s, device=x.device)[None, :] >= counts[:, None]] = -1.0  # padding: never
    d2, buf = torch.empty_like(dist), torch.empty_like(dist)  # (B, S) reused every step
    out = torch.empty(b, num, dtype=torch.long, device=x.device)
    current = start
    for i in range(num):
        out[:, i] = current
        if i == num - 1:
            break
        dist[scenes, current] = -1.0  # selected: never again (real distances are >= 0)
        c = planes[:, scenes, current]  # (D, B) coordinates of the newest sample
        torch.sub(planes[0], c[0][:, None], out=d2).square_()
        for j in range(1, d):  # d2 += (x_j - c_j)^2, in place
            torch.sub(planes[j], c[j][:, None], out=buf)
            d2.addcmul_(buf, buf)
        torch.minimum(dist, d2, out=dist)
        current = dist.argmax(dim=1)  # (B,) first maximum on ties
    return out


def farthest_point_sampling(points: torch.Tensor, num: int, *,
                            batch_index: torch.Tensor | None = None,
                            num_scenes: int | None = None,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Farthest point sampling of ``num`` points per scene (PointNet++ / VoteNet).

    Args:
        points: (B, N, D) padded batch, or (N, D) packed rows with ``batch_index``.
        num: samples per scene; every scene needs at least ``num`` points.
        batch_index: (N,) int scene of each packed row (all rows one scene when ``None``).
        num_scenes: B for packed input; ``batch_index.max() + 1`` when ``None``.
        generator: ``None`` starts at each scene's first point (deterministic, as the reference
            kernels); a ``torch.Generator`` draws each scene's first point uniformly from it.

    Returns:
        (B, num) int64 indices: into dim 1 of a padded batch, or into the rows of packed points.
        Selection order is kept: column 0 is the start, column i the i-th farthest point.
    """
    points = _check_points(points, "points")
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int (samples per scene), got {num!r}")
    if points.ndim == 3:
        if batch_index is not None:
            raise ValueError("batch_index is for packed (N, D) points; points are already a "
                             f"padded batch of shape {tuple(points.shape)}")
        x, rows = points, None
        counts = torch.full((points.shape[0],), points.shape[1], dtype=torch.long,
                            device=points.device)
    else:
        batch_index, b = _check_batch_index(batch_index, points.shape[0], points.device,
                                            "batch_index", num_scenes)
        x, rows, counts = pad_by_scene(points, batch_index, b)
    short = (counts < num).nonzero()[:, 0]
    if len(short):
        s = int(short[0])
        raise ValueError(f"farthest_point_sampling: scene {s} has {int(counts[s])} points, fewer "
                         f"than num={num} samples ({len(short)} scene(s) too small); lower num or "
                         "drop/repeat points of small scenes first")
    if generator is None:
        start = torch.zeros_like(counts)
    else:
        u = torch.rand(len(counts), generator=generator, device=generator.device,
                       dtype=torch.float64).to(counts.device)
        start = torch.minimum((u * counts).long(), counts - 1)
    slots = _fps_padded(x, counts, num, start)  # (B, num)
    return slots if rows is None else rows.gather(1, slots)


def _squared_distances(planes: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(m, S) squared distances of centres c (m, D) to points given as planes (D, S)."""
    d2 = (planes[0][None, :] - c[:, :1]).square_()
    for j in range(1, planes.shape[0]):  # d2 += (x_j - c_j)^2, as in FPS
        diff = planes[j][None, :] - c[:, j:j + 1]
        d2.addcmul_(diff, diff)
    return d2


def _ball_query_rows(padded: torch.Tensor, counts: torch.Tensor, centres: torch.Tensor,
                     scene: torch.Tensor, radius2: float, k: int, chunk_elems: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ball query of centres (R, D), centre r against the first counts[s] points of scene
    s = scene[r] of padded (B, S, D). Scenes are visited one by one (a loop over B), their
    centres in chunks, so distances are only computed to real points of the right scene.

    Returns (R, k) int64 slots into dim 1 (-1 for empty balls) and (R,) int64 counts.
    """
    r = centres.shape[0]
    dev = centres.device
    idx = torch.full((r, k), -1, dtype=torch.long, device=dev)
    count = torch.zeros(r, dtype=torch.long, device=dev)
    slots = torch.arange(k, device=dev)
    order = torch.sort(scene, stable=True).indices  # centres grouped by scene
    per_scene = torch.bincount(scene, minlength=len(counts)).tolist()
    planes = padded.permute(0, 2, 1)  # (B, D, S)
    first = 0
    for b, n_centres in enumerate(per_scene):
        rows_b = order[first:first + n_centres]
        first += n_centres
        n_points = int(counts[b])
        if n_centres == 0 or n_points == 0:
            continue
        pts = planes[b, :, :n_points].contiguous()  # (D, S_b)
        step = max(1, chunk_elems // n_points)
        for lo in range(0, n_centres, step):
            rows = rows_b[lo:lo + step]
            inside = _squared_distances(pts, centres[rows]) < radius2  # (m, S_b)
            row, col = inside.nonzero(as_tuple=True)  # row-major: columns ascend in a row
            found = torch.bincount(row, minlength=len(rows))  # (m,) points in each ball
            rank = torch.arange(len(row), device=dev) - (found.cumsum(0) - found)[row]
            keep = rank < k
            out = torch.full((len(rows), k), -1, dtype=torch.long, device=dev)
            out[row[keep], rank[keep]] = col[keep]
            n = found.clamp_max(k)
            idx[rows] = torch.where(slots[None, :] < n[:, None], out, out[:, :1])  # pad
            count[rows] = n
    return idx, count


def ball_query(points: torch.Tensor, centres: torch.Tensor, radius: float, k: int, *,
               points_batch: torch.Tensor | None = None,
               centres_batch: torch.Tensor | None = None,
               num_scenes: int | None = None,
               chunk_elems: int = _CHUNK_ELEMS) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of up to ``k`` points within ``radius`` of each centre (PointNet++ grouping).

    A point is in the ball when its squared distance is strictly below ``radius**2``. Each row
    holds the first ``k`` such points in index order; a row with ``0 < count < k`` is padded by
    repeating its first index (PointNet++), an empty ball is all ``-1`` with count 0.

    Args:
        points: (B, N, D) padded batch, or (N, D) packed rows with ``points_batch``.
        centres: (B, M, D) for a padded batch, or (M, D) packed with ``centres_batch``.
        radius: ball radius (> 0), in the units of the coordinates.
        k: neighbours per centre (>= 1).
        points_batch, centres_batch: (N,), (M,) int scene of each packed row (one scene when
            both are ``None``); centres only see points of their own scene.
        num_scenes: B for packed input (largest scene index + 1 when ``None``).
        chunk_elems: at most this many centre-point distances are held at once.

    Returns:
        idx (B, M, k) int64 into dim 1 of ``points``, or (M, k) into its packed rows; count
        (B, M) or (M,) int64, the number of distinct valid entries per row (``min(found, k)``).
    """
    points = _check_points(points, "points")
    centres = _check_points(centres, "centres")
    if not (isinstance(radius, (int, float)) and radius > 0):
        raise ValueError(f"radius must be a positive number, got {radius!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (neighbours per centre), got {k!r}")
    if points.ndim != centres.ndim or points.shape[-1] != centres.shape[-1] \
            or (points.ndim == 3 and points.shape[0] != centres.shape[0]):
        raise ValueError(f"points {tuple(points.shape)} and centres {tuple(centres.shape)} must "
                         "both be padded (B, N, D) / (B, M, D) or both packed (N, D) / (M, D)")
    if points.device != centres.device:
        raise ValueError(f"points are on {points.device} but centres on {centres.device}")
    centres = centres.to(points.dtype)
    r2 = float(radius) ** 2
    if points.ndim == 3:
        if points_batch is not None or centres_batch is not None:
            raise ValueError("points_batch/centres_batch are for packed (N, D) inputs; these are "
                             "padded batches")
        b, m = centres.shape[:2]
        scene = torch.arange(b, device=points.device).repeat_interleave(m)  # (B*M,)
        counts = torch.full((b,), points.shape[1], dtype=torch.long, device=points.device)
        idx, count = _ball_query_rows(points, counts, centres.reshape(b * m, -1), scene, r2, k,
                                      chunk_elems)
        return idx.view(b, m, k), count.view(b, m)
    if (points_batch is None) != (centres_batch is None):
        raise ValueError("pass both points_batch and centres_batch (or neither for one scene)")
    pb, b = _check_batch_index(points_batch, points.shape[0], points.device, "points_batch",
                               num_scenes)
    cb, b = _check_batch_index(centres_batch, centres.shape[0], points.device, "centres_batch",
                               b if points_batch is not None else 1)
    padded, rows, counts = pad_by_scene(points, pb, b)
    slots, count = _ball_query_rows(padded, counts, centres, cb, r2, k, chunk_elems)
    idx = torch.where(slots >= 0, rows[cb[:, None], slots.clamp_min(0)], slots)  # packed rows
    return idx, count
