"""common.data: the synthetic dataset, export round trips through the real-format loaders, bad
input, transforms, samplers and subsets."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from common.data import (CocoDetection, GroupedBatchSampler, ImageFolderDataset, SeededDataset, VOCDetection,
                         build_classification_dataset, build_detection_dataset, build_loader,
                         detection_transforms, fraction_split, kshot_subset, load_split, save_split,
                         subset_by_ids)
from common.synthetic import SHAPES, SyntheticDetection, export_coco, export_imagefolder, export_voc


def test_synthetic_is_deterministic_and_seed_dependent():
    a, b, c = SyntheticDetection(3, 96, seed=1), SyntheticDetection(3, 96, seed=1), SyntheticDetection(3, 96, seed=2)
    ia, ta = a[2]
    ib, tb = b[2]
    assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"])
    assert not torch.equal(ia, c[2][0])


def test_synthetic_scenes_targets_are_consistent():
    ds = SyntheticDetection(30, 128, seed=0)
    counts = []
    for i in range(len(ds)):
        img, t = ds[i]
        assert img.shape == (3, 128, 128) and img.dtype == torch.uint8
        boxes, masks = t["boxes"], t["masks"].bool()
        assert len(boxes) == len(t["labels"]) == len(masks) >= 1
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert boxes.min() >= 0 and boxes.max() <= 128
        for b, m in zip(boxes.long(), masks):  # box = tight box of the visible mask
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == b.tolist()
        assert not (masks.sum(0) > 1).any()  # visible masks do not overlap
        counts.append(len(boxes))
        assert t["labels"].min() >= 1 and t["labels"].max() <= len(SHAPES)
    assert max(counts) > min(counts)  # several objects per image, varied


def test_synthetic_modes():
    obj = SyntheticDetection(10, 96, mode="object", seed=0)
    img, t = obj[0]
    assert set(t) == {"image_id", "image_label"} and 0 <= t["image_label"] < len(SHAPES)
    ann = obj.annotations(0)
    assert (ann["labels"] == t["image_label"] + 1).all() and len(ann["boxes"]) >= 1
    x, y = obj.classification()[0]
    assert y == t["image_label"] and torch.equal(x, img)
    unl = SyntheticDetection(4, 96, mode="unlabeled", seed=0)
    assert set(unl[0][1]) == {"image_id"} and len(unl.annotations(0)["boxes"]) >= 1
    with pytest.raises(ValueError, match="mode"):
        SyntheticDetection(4, 96, mode="nope")
    with pytest.raises(ValueError, match="object"):
        SyntheticDetection(4, 96).classification()


def test_long_tail_frequencies():
    ds = SyntheticDetection(300, 64, seed=0, long_tail=20)
    c = Counter(int(l) for i in range(len(ds)) for l in ds.annotations(i)["labels"])
    assert c[1] > 5 * max(c.get(8, 0), 1)
    assert ds.class_probs[0] / ds.class_probs[-1] == pytest.approx(20)


def test_coco_export_round_trip(tmp_path):
    ds = SyntheticDetection(6, 96, seed=7)
    path = export_coco(ds, tmp_path, "train")
    assert path == tmp_path / "annotations" / "instances_train.json"
    coco = build_detection_dataset(str(tmp_path), "train")
    assert isinstance(coco, CocoDetection) and coco.classes == SHAPES and len(coco) == 6
    for i in range(len(ds)):
        img, t = coco[i]
        ref_img, ref_t = ds[i]
        assert torch.equal(img, ref_img)  # PNG: lossless
        assert torch.equal(t["boxes"], ref_t["boxes"]) and torch.equal(t["labels"], ref_t["labels"])
        assert t["image_id"] == ds.image_ids[i]
        np.testing.assert_allclose(t["area"].numpy(), ref_t["masks"].flatten(1).sum(1).numpy())
    assert coco.num_dropped_boxes == 0


def test_voc_export_round_trip_with_difficult(tmp_path):
    ds = SyntheticDetection(8, 96, seed=3)
    root = export_voc(ds, tmp_path, "trainval")
    voc = build_detection_dataset(str(root), "trainval")
    assert isinstance(voc, VOCDetection) and voc.classes == SHAPES
    for i in range(len(ds)):
        ref = ds.annotations(i)
        ann = voc.annotations(i)
        np.testing.assert_array_equal(ann["boxes"], ref["boxes"])
        np.testing.assert_array_equal(ann["labels"], ref["labels"])
        np.testing.assert_array_equal(ann["difficult"], ref["difficult"])
    img, t = voc[0]
    assert img.shape == (3, 96, 96) and "difficult" in t
    easy = VOCDetection(root, "trainval", keep_difficult=False)
    assert not easy.difficult.any()
    # VOC07+12: two roots concatenated
    root12 = export_voc(SyntheticDetection(3, 96, seed=4), tmp_path, "trainval", year="2012")
    both = build_detection_dataset(f"{root},{root12}", "trainval")
    assert len(both) == 11


def test_imagefolder_round_trip(tmp_path):
    ds = SyntheticDetection(5, 64, mode="object", seed=1)  # fewer images than classes: empty folders
    export_imagefolder(ds, tmp_path / "train")
    folder = build_classification_dataset(str(tmp_path), "train")
    assert isinstance(folder, ImageFolderDataset) and folder.classes == SHAPES
    labels = sorted(y for _, y in (folder[i] for i in range(len(folder))))
    assert labels == sorted(ds.classification()[i][1] for i in range(len(ds)))


def test_missing_paths_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="Expected a COCO root"):
        build_detection_dataset(str(tmp_path / "nowhere"), "train")
    (tmp_path / "annotations").mkdir()
    with pytest.raises(FileNotFoundError, match=r"instances_val\.json.*Expected layout"):
        build_detection_dataset(str(tmp_path), "val")
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        VOCDetection(tmp_path, "trainval")
    with pytest.raises(FileNotFoundError, match="ImageFolder root not found"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images in the class folders"):
        ImageFolderDataset(tmp_path / "empty")


def test_malformed_and_degenerate_annotations(tmp_path):
    ds = SyntheticDetection(3, 64, seed=0)
    path = export_coco(ds, tmp_path, "train")
    data = json.loads(path.read_text())
    data["annotations"][0]["bbox"] = [5.0, 5.0, 0.0, 10.0]  # zero width: degenerate
    data["annotations"][1]["bbox"] = [200.0, 5.0, 10.0, 10.0]  # outside the image: degenerate
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="dropped 2 degenerate"):
        coco = CocoDetection(tmp_path / "train", path)
    assert coco.num_dropped_boxes == 2 and len(coco.boxes) == len(data["annotations"]) - 2
    data["annotations"][2]["bbox"] = [1, 2, 3]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"malformed annotation id 3.*bbox"):
        CocoDetection(tmp_path / "train", path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="malformed COCO annotation file"):
        CocoDetection(tmp_path / "train", path)


def test_malformed_voc_xml_and_empty_image(tmp_path):
    root = export_voc(SyntheticDetection(2, 64, seed=0), tmp_path)
    xml = sorted((root / "Annotations").glob("*.xml"))[0]
    xml.write_text("<annotation><size><width>64</width></size>")
    with pytest.raises(ValueError, match=f"malformed VOC annotation {xml}"):
        VOCDetection(root, "trainval")
    export_coco(SyntheticDetection(2, 64, seed=0), tmp_path / "coco", "train")
    first = sorted((tmp_path / "coco" / "train").glob("*.png"))[0]
    first.write_bytes(b"")
    coco = build_detection_dataset(str(tmp_path / "coco"), "train")
    with pytest.raises(ValueError, match="empty image file"):
        coco[0]


def test_train_transforms_resize_and_flip_boxes():
    ds = SyntheticDetection(1, 100, seed=0)
    img, t = ds[0]
    flip = detection_transforms(True, scales=(200,), max_size=1000, hflip=1.0)
    out_img, out_t = flip(img, t)
    assert out_img.shape == (3, 200, 200) and out_img.dtype == torch.float32
    ref = t["boxes"] * 2
    expected = torch.stack([200 - ref[:, 2], ref[:, 1], 200 - ref[:, 0], ref[:, 3]], 1)
    torch.testing.assert_close(out_t["boxes"].as_subclass(torch.Tensor), expected.as_subclass(torch.Tensor))
    assert out_t["masks"].shape[-2:] == (200, 200)
    capped = detection_transforms(True, scales=(800,), max_size=300, hflip=0)(img, t)[0]
    assert max(capped.shape[-2:]) == 300
    ev_img, ev_t = detection_transforms(False)(img, t)
    assert ev_img.shape == img.shape and torch.equal(ev_t["boxes"], t["boxes"])


class _Sizes:
    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)


def test_grouped_batch_sampler_groups_shards_and_resumes():
    groups = [i % 3 == 0 for i in range(40)]
    per_rank = []
    for rank in range(2):
        s = GroupedBatchSampler(DistributedSampler(_Sizes(groups), 2, rank, shuffle=True, seed=0), groups, 4)
        s.set_epoch(1)
        batches = list(s)
        assert len(batches) == len(s) == 5
        grouped = batches[:-1]  # leftovers may mix at the end
        assert sum(len({groups[i] for i in b}) == 1 for b in grouped) >= 3
        s.set_epoch(1, start_batch=2)
        assert list(s) == batches[2:]
        per_rank.append({i for b in batches for i in b})
    assert not per_rank[0] & per_rank[1]  # ranks see different images


def test_seeded_dataset_is_reproducible_per_epoch_and_index():
    ds = SeededDataset(SyntheticDetection(4, 64, transforms=detection_transforms(True, scales=(32, 48, 64, 80))), 0)
    a = [ds[i][0].shape for i in range(4)]
    torch.manual_seed(123)  # the global RNG must not matter
    assert [ds[i][0].shape for i in range(4)] == a
    shapes = set()
    for e in range(6):
        ds.set_epoch(e)
        shapes.add(ds[0][0].shape)
    assert len(shapes) > 1


def test_loader_refuses_a_batch_larger_than_the_data():
    with pytest.raises(ValueError, match="fewer than the per-rank batch"):
        build_loader(SyntheticDetection(3, 64), batch_size=4, train=True, workers=0)


def test_kshot_and_fraction_splits(tmp_path):
    ds = SyntheticDetection(120, 64, seed=0)
    ids = kshot_subset(ds, 5, seed=1)
    assert ids == kshot_subset(ds, 5, seed=1) and ids != kshot_subset(ds, 5, seed=2)
    sub = subset_by_ids(ds, ids)
    per_class = Counter(int(c) for i in range(len(sub)) for c in np.unique(sub.annotations(i)["labels"]))
    assert all(per_class[c] >= 5 for c in range(1, 9)) and len(ids) < 60
    lab, unl = fraction_split(ds, 0.1, seed=0)
    assert len(lab) == 12 and len(unl) == 108 and not set(lab) & set(unl)
    assert (lab, unl) == fraction_split(ds, 0.1, seed=0)
    save_split(tmp_path / "split.json", {"labelled": lab, "unlabelled": unl})
    assert load_split(tmp_path / "split.json") == {"labelled": lab, "unlabelled": unl}
    with pytest.raises(KeyError, match="not in the dataset"):
        subset_by_ids(ds, [10_000])


def test_imagefolder_pickles_and_loads_under_spawn(tmp_path):
    """No lambda inside (workers under spawn / forkserver get a pickled copy); paths and labels are
    flat arrays, not a per-image list of tuples."""
    import pickle

    export_imagefolder(SyntheticDetection(4, 32, mode="object", seed=2), tmp_path)
    folder = ImageFolderDataset(tmp_path)
    assert isinstance(folder.targets, np.ndarray) and not hasattr(folder, "folder")
    copy = pickle.loads(pickle.dumps(folder))
    assert len(copy) == 4 and all(torch.equal(copy[i][0], folder[i][0]) for i in range(4))
    assert [copy.relpath(i).split("/")[0] for i in range(4)] == [folder.classes[t] for t in folder.targets]
    loader = torch.utils.data.DataLoader(folder, batch_size=2, num_workers=1, multiprocessing_context="spawn")
    labels = torch.cat([y for _, y in loader]).tolist()
    assert labels == folder.targets.tolist()


def test_sanitize_filters_every_per_box_field():
    """A box dropped by SanitizeBoundingBoxes takes its label, crowd / difficult flags, area and
    mask with it: the fields stay aligned with the boxes."""
    from torchvision import tv_tensors

    boxes = torch.tensor([[0, 0, 10, 10], [5, 5, 5.5, 20], [20, 20, 40, 40]])
    masks = torch.zeros(3, 64, 64, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes.ceil().long().tolist()):
        masks[k, y1:y2, x1:x2] = 1
    target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(64, 64)),
              "labels": torch.tensor([1, 2, 3]), "iscrowd": torch.tensor([False, True, False]),
              "difficult": torch.tensor([True, False, False]), "area": torch.tensor([100.0, 7.5, 400.0]),
              "masks": tv_tensors.Mask(masks), "image_id": 7}
    image = tv_tensors.Image(torch.zeros(3, 64, 64, dtype=torch.uint8))
    _, out = detection_transforms(True, scales=(64,), max_size=1000, hflip=0)(image, target)
    assert out["labels"].tolist() == [1, 3] and out["image_id"] == 7
    assert out["iscrowd"].tolist() == [False, False] and out["difficult"].tolist() == [True, False]
    assert out["area"].tolist() == [100.0, 400.0] and out["masks"].flatten(1).sum(1).tolist() == [100, 400]
