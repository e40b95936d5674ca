"""Bytes per fragment: our fragment store vs the published float64 point-cloud npz.

For the 100 real 7-Scenes frames (../shared/realdata), or synthetic frames where that data is
absent, it prints the mean bytes per fragment of

- ours: zlib depth + JPEG colour (+ the index's share), the files ``mink-ssl-prep`` writes;
- a float64 xyz npz of the same frame (``np.savez(pcd=(N, 3))``), and the published
  ``(N, 7)`` float64 npz (xyz, rgb, pad),

their ratios, and the fraction of the frame's occupied 2.5 cm voxels that our stored fragment
preserves (compared with the voxels of the raw depth frame back-projected in float64).

    .venv/bin/python benchmarks/bench_storage.py
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import KITCHEN, prepare, workdir  # noqa: E402


def npz_bytes(**arrays) -> int:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getbuffer().nbytes


_KEY_BITS = 21  # bits per axis of a packed voxel key: cells within +-2**20 (+-26 km at 2.5 cm)


def voxel_keys(points: np.ndarray, voxel: float = 0.025) -> np.ndarray:
    """The occupied voxels of ``points`` as sorted unique int64 keys (x, y, z cells packed in
    21 bits each): the same set as ``{tuple(c) for c in floor(points / voxel)}``, without a
    Python tuple per point (that set took about 0.3 s per 640x480 frame)."""
    cells = np.floor(points / voxel).astype(np.int64)
    half = 1 << (_KEY_BITS - 1)
    if len(cells) and (cells.min() < -half or cells.max() >= half):
        raise ValueError(f"voxel cells beyond +-{half} at {voxel} m: points up to "
                         f"{np.abs(points).max():.1f} m from the origin do not fit a packed key")
    cells += half
    return np.unique((cells[:, 0] << (2 * _KEY_BITS)) | (cells[:, 1] << _KEY_BITS) | cells[:, 2])


def main() -> int:
    from data_prep.scannet.exported import ExportedFrames
    from data_prep.scannet.sens import SensReader
    from mink_ssl.formats.fragments import INDEX_FILE, PAYLOAD_FILE, FragmentStore

    with workdir() as tmp:
        tmp = Path(tmp)
        if (KITCHEN / "depth").is_dir():
            raw_dir, source = KITCHEN, "7-Scenes RedKitchen (real Kinect, 640x480)"
            reader = ExportedFrames(KITCHEN)
        else:
            from data_prep.synthetic import generate_scene

            raw_dir = generate_scene(tmp / "raw", "scene0000_00", 0, n_frames=100,
                                     image_size=(640, 480))
            source = "synthetic ScanNet scene (640x480; ../shared/realdata absent)"
            reader = SensReader(raw_dir / "scene0000_00.sens")
        store = FragmentStore(prepare(raw_dir, tmp / "out"))
        ours = ((store.dir / PAYLOAD_FILE).stat().st_size
                + (store.dir / INDEX_FILE).stat().st_size) / len(store)
        xyz64, pcd7, kept = [], [], []
        h = reader.header
        for k, frame_id in enumerate(store.frames.tolist()):
            f = reader.frame(frame_id)
            depth = f.depth(h).astype(np.float64)
            # reference points in float64 from the raw depth frame
            v, u = np.nonzero(depth)
            z = depth[v, u] / h.depth_shift
            K, pose = h.intrinsic_depth.astype(np.float64), f.camera_to_world.astype(np.float64)
            cam = np.stack([(u - K[0, 2]) * z / K[0, 0], (v - K[1, 2]) * z / K[1, 1], z], 1)
            ref = cam @ pose[:3, :3].T + pose[:3, 3]
            xyz64.append(npz_bytes(pcd=ref))
            pcd7.append(npz_bytes(pcd=np.zeros((len(ref), 7))))
            mine = voxel_keys(store[k].points()[0])
            full = voxel_keys(ref)
            kept.append(np.intersect1d(mine, full, assume_unique=True).size / full.size)
    print(f"{source}: {len(store)} fragments")
    print(f"  ours (zlib depth + JPEG colour + index): {ours / 1e3:8.1f} KB per fragment")
    print(f"  float64 xyz npz                        : {np.mean(xyz64) / 1e3:8.1f} KB  "
          f"-> ours is {np.mean(xyz64) / ours:.1f}x smaller")
    print(f"  published (N, 7) float64 npz           : {np.mean(pcd7) / 1e3:8.1f} KB  "
          f"-> ours is {np.mean(pcd7) / ours:.1f}x smaller")
    print(f"  occupied 2.5 cm voxels preserved       : mean {100 * np.mean(kept):.3f}%, "
          f"min {100 * np.min(kept):.3f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
