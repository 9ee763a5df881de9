"""Where a model that takes candidate masks (MaIL) gets them: data.build_dataset's `candidates`
(oracle / simulated / a proposals file), their bounds, and how each source is named."""

import json

import numpy as np
import pytest
from helpers import ref, write_refer

import data
from common.candidates import candidate_label, encode_candidates


@pytest.fixture
def crowd_root(tmp_path):
    """One 20x30 image: two objects, a crowd region between them, and a degenerate polygon."""
    images = [{"id": 5, "height": 20, "width": 30, "file_name": "COCO_train2014_000000000005.jpg"}]
    anns = [
        {"id": 1, "image_id": 5, "category_id": 1, "iscrowd": 0,
         "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8]]},
        {"id": 2, "image_id": 5, "category_id": 1, "iscrowd": 1,  # "people": many objects
         "segmentation": {"size": [20, 30], "counts": [20 * 10, 20 * 5, 20 * 15]}},
        {"id": 3, "image_id": 5, "category_id": 1, "iscrowd": 0,  # with a stray point
         "segmentation": [[20, 10, 28, 10, 28, 18, 20, 18], [3, 3]]},
    ]
    refs = [ref(0, 3, 5, "val", "the right one"), ref(1, 2, 5, "val", "the crowd")]
    write_refer(tmp_path, refs, images, anns)
    return str(tmp_path)


def test_oracle_excludes_crowd_annotations_but_never_the_target(crowd_root):
    ds = data.build_dataset("refcoco", "val", data_root=crowd_root, candidates="oracle")
    plain = ds[0]
    assert len(plain["instances"]) == 2  # ann 1 and ann 3; the crowd region is no candidate
    assert np.array_equal(plain["instances"][plain["target_index"]], plain["mask"])
    assert plain["instances"][1 - plain["target_index"]][:8, :8].all()
    crowd = ds[1]  # the referred object is the crowd region itself: it stays a candidate
    assert len(crowd["instances"]) == 3 and crowd["target_index"] == 1
    assert crowd["mask"].sum() == 20 * 5


def test_oracle_max_candidates_keeps_the_target():
    full = data.build_dataset("shapes", "val", shapes_size=30, shapes_image_size=64,
                              candidates="oracle")
    i = next(i for i in range(30) if len(full[i]["instances"]) >= 4
             and full[i]["target_index"] >= 2)  # the target is not among the first two
    s = full[i]
    for k in (1, 2):
        cut = data.build_dataset("shapes", "val", shapes_size=30, shapes_image_size=64,
                                 candidates="oracle", max_candidates=k)[i]
        assert len(cut["instances"]) == k
        assert np.array_equal(cut["instances"][cut["target_index"]], s["mask"])
    two = data.build_dataset("shapes", "val", shapes_size=30, shapes_image_size=64,
                             candidates="oracle", max_candidates=2)
    assert np.array_equal(two[i]["instances"][0], s["instances"][0])  # then annotation order
    assert two.sentence(i) == full.sentence(i)
    with pytest.raises(ValueError, match="max_candidates"):
        data.build_dataset("shapes", "val", shapes_size=3, candidates="oracle", max_candidates=0)


def test_proposals_file_bounds_by_score_and_count(tmp_path):
    shapes = data.ShapesDataset("val", 4, 64)
    masks = shapes[0]["instances"]
    entries = encode_candidates(0, masks[:3], scores=[0.2, 0.9, 0.5])
    for i in (2, 3):  # image 1 has none (3 of the 4 images covered: a warning, not a refusal)
        entries += encode_candidates(i, shapes[i]["instances"][:1], scores=[0.9])
    path = tmp_path / "props.json"
    path.write_text(json.dumps(entries))
    kw = dict(shapes_size=4, shapes_image_size=64, candidates=str(path))
    every = data.build_dataset("shapes", "val", **kw)[0]
    assert len(every["instances"]) == 3 and every["target_index"] == -1
    assert every["candidate_scores"].tolist() == pytest.approx([0.9, 0.5, 0.2])  # best first
    bounded = data.build_dataset("shapes", "val", min_score=0.3, max_candidates=1, **kw)[0]
    assert len(bounded["instances"]) == 1 and np.array_equal(bounded["instances"][0], masks[1])
    assert data.build_dataset("shapes", "val", min_score=0.3, **kw)[0]["instances"].shape[0] == 2
    assert data.build_dataset("shapes", "val", **kw)[1]["instances"].shape == (0, 64, 64)


def test_simulated_proposals_are_seeded_and_bounded():
    kw = dict(shapes_size=6, shapes_image_size=64, candidates="simulated")
    a = data.build_dataset("shapes", "val", max_candidates=3, **kw)
    b = data.build_dataset("shapes", "val", max_candidates=3, **kw)
    for i in range(6):
        x, y = a[i], b[i]
        assert len(x["instances"]) <= 3 and x["target_index"] == -1
        assert np.array_equal(x["instances"], y["instances"])  # same on every process and run
        assert np.all(np.diff(x["candidate_scores"]) <= 0)
    high = data.build_dataset("shapes", "val", min_score=0.99, **kw)
    assert all((high[i]["candidate_scores"] >= 0.99).all() for i in range(6))


def test_candidates_must_be_a_source_name_or_a_path():
    with pytest.raises(TypeError, match="proposals file's path"):
        data.build_dataset("shapes", "val", shapes_size=2, candidates={0: []})
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        data.build_dataset("shapes", "val", shapes_size=2, candidates="nowhere.json")


def test_candidate_source_and_label():
    assert data.candidate_source("shapes") == "simulated"
    assert data.candidate_source("refcoco", oracle=True) == "oracle"
    assert data.candidate_source("refcoco", "p/props.json") == "p/props.json"
    with pytest.raises(ValueError, match="--oracle-candidates") as err:
        data.candidate_source("refcoco")
    assert "python -m common.detector" in str(err.value) and "refcoco" in str(err.value)
    with pytest.raises(ValueError, match="exclude each other"):
        data.candidate_source("shapes", "p.json", oracle=True)
    assert [candidate_label(s) for s in ("oracle", "simulated", "/runs/a/props.json")] == \
        ["oracle", "simulated", "props.json"]
