"""Damaged prepared data is named (reliability issue, item 8): a corrupted depth or colour
payload and a truncated fragment index name the scene, the fragment and the file, and say how
to redo the scene; the copies are damaged here, the prepared originals stay intact."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from mink_ssl.formats.fragments import INDEX_FILE, PAYLOAD_FILE, FragmentStore


@pytest.fixture
def scene_copy(synthetic_pairs, tmp_path):
    src = next(p for p in sorted(synthetic_pairs.iterdir()) if (p / INDEX_FILE).is_file())
    return shutil.copytree(src, tmp_path / src.name)


def test_corrupted_depth_payload_names_scene_fragment_and_file(scene_copy):
    store = FragmentStore(scene_copy)
    ok = store[1]  # another fragment still reads
    offset, length = (int(v) for v in store._depth[0])
    with open(scene_copy / PAYLOAD_FILE, "r+b") as f:
        f.seek(offset + 2)
        f.write(bytes(b ^ 0xFF for b in f.read(64)))  # flip bytes inside the zlib stream
        f.seek(offset + 2)
    store = FragmentStore(scene_copy)
    name = store.names()[0]
    with pytest.raises(ValueError, match=rf"scene {scene_copy.name}: .*{PAYLOAD_FILE} is damaged: "
                                         rf"the depth of fragment {name} does not decode.*rerun "
                                         r"`mink-ssl-prep scannet`"):
        store[0]
    np.testing.assert_array_equal(store[1].depth, ok.depth)


def test_corrupted_colour_payload_names_the_fragment(scene_copy):
    store = FragmentStore(scene_copy)
    offset, length = (int(v) for v in store._color[0])
    with open(scene_copy / PAYLOAD_FILE, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * min(length, 256))  # the JPEG header gone
    with pytest.raises(ValueError, match=r"the colour JPEG of fragment .*/\d{6} does not decode"):
        FragmentStore(scene_copy)[0]
    assert FragmentStore(scene_copy).get(0, color=False).depth.shape == store.image_size


def test_truncated_fragment_index_names_scene_and_file(scene_copy, synthetic_pairs):
    index = scene_copy / INDEX_FILE
    size = index.stat().st_size
    with open(index, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=rf"scene {scene_copy.name}: .*{INDEX_FILE} is damaged "
                                         r"\(BadZipFile.*delete .* and rerun"):
        FragmentStore(scene_copy)
    assert (synthetic_pairs / scene_copy.name / INDEX_FILE).stat().st_size == size  # original


@pytest.mark.parametrize("text", ["{\"schema\": \"mink_ssl.scannet_pairs/1\", \"scen", "[1, 2]",
                                  "\udcff"], ids=["cut", "a list", "binary"])
def test_a_damaged_manifest_is_named_and_prep_rewrites_it(synthetic_pairs, tmp_path, text):
    from data_prep.pairs.prep import PrepParams, run as run_prep
    from mink_ssl.data.pairs import PairDataset

    out = tmp_path / "pairs"
    shutil.copytree(synthetic_pairs, out)
    good = (out / "manifest.json").read_bytes()
    (out / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=r"pairs/manifest\.json (is not valid JSON|holds a JSON "
                                         r"list).*rerun `mink-ssl-prep scannet`"):
        PairDataset(out, voxel_size=0.05)
    # the advice holds: rerunning prep into the folder rewrites it, the scenes kept
    run_prep(synthetic_pairs.parent / "raw", out, PrepParams(frame_skip=25), progress=False)
    assert (out / "manifest.json").read_bytes() == good
    PairDataset(out, voxel_size=0.05)


@pytest.mark.parametrize("damage", ["truncated store", "missing scene"])
def test_a_damaged_store_is_named_when_the_dataset_is_built(synthetic_pairs, tmp_path, damage):
    """Found at build time (one stat per file against scene.json's sizes), not when a pair of
    the scene is reached; prep's rerun repairs it."""
    from data_prep.pairs.prep import PrepParams, run as run_prep
    from mink_ssl.data.pairs import PairDataset

    out = tmp_path / "pairs"
    shutil.copytree(synthetic_pairs, out)
    scene = next(p for p in sorted(out.iterdir()) if (p / INDEX_FILE).is_file())
    if damage == "truncated store":
        with open(scene / PAYLOAD_FILE, "r+b") as f:
            f.truncate(1000)
        match = rf"{scene.name}/{PAYLOAD_FILE} has 1000 bytes, \d+ recorded \(truncated"
    else:
        shutil.rmtree(scene)
        match = rf"{scene.name}: no scene.json"
    with pytest.raises(ValueError, match=match + r".*Rerun `mink-ssl-prep scannet`"):
        PairDataset(out, voxel_size=0.05)
    run_prep(synthetic_pairs.parent / "raw", out, PrepParams(frame_skip=25), progress=False)
    assert len(PairDataset(out, voxel_size=0.05)) > 0
