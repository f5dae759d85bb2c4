"""common.data: the synthetic dataset, export round trips through the real-format loaders, bad
input, transforms, samplers and subsets."""
import json
import os
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
        coco = CocoDetection(tmp_path / "train", path, train=True)
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


def test_fraction_splits(tmp_path):
    ds = SyntheticDetection(120, 64, seed=0)
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


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths of the column-major mask, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return {"counts": ([0] + runs) if flat[0] else runs, "size": list(mask.shape)}


def _hand_made_coco(tmp_path):
    """Export of 5 synthetic images, then edited: image 1 has a crowd box (uncompressed RLE) among
    its boxes, image 2 only a crowd box, image 3 only a zero-width box, image 4 no annotation at
    all, image 5 is untouched. Image 1's second annotation becomes a polygon."""
    ds = SyntheticDetection(5, 64, seed=0)
    path = export_coco(ds, tmp_path, "train")
    data = json.loads(path.read_text())
    per_image = {i: [a for a in data["annotations"] if a["image_id"] == i] for i in range(1, 6)}
    masks = {i: ds.annotations(i - 1, masks=True)["masks"] for i in range(1, 6)}
    one = per_image[1]
    one[0].update(iscrowd=1, segmentation=_uncompressed_rle(masks[1][0]))
    x, y, w, h = one[1]["bbox"]
    one[1]["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]  # a polygon: its box
    per_image[2] = per_image[2][:1]
    per_image[2][0].update(iscrowd=1, segmentation=_uncompressed_rle(masks[2][0]))
    per_image[3] = per_image[3][:1]
    per_image[3][0]["bbox"][2] = 0.0
    per_image[4] = []
    data["annotations"] = [a for i in range(1, 6) for a in per_image[i]]
    path.write_text(json.dumps(data))
    return path, data, per_image, masks


def test_coco_train_drops_crowd_and_empty_images_eval_keeps_everything(tmp_path):
    path, data, per_image, _ = _hand_made_coco(tmp_path)
    ev = CocoDetection(tmp_path / "train", path)  # train=False: every image, every box as written
    assert ev.image_ids == [1, 2, 3, 4, 5] and len(ev.boxes) == len(data["annotations"])
    assert ev.annotations(0)["iscrowd"].tolist() == [True] + [False] * (len(per_image[1]) - 1)
    assert ev[1][1]["iscrowd"].tolist() == [True] and len(ev[3][1]["boxes"]) == 0
    x, y, _, h = per_image[3][0]["bbox"]
    np.testing.assert_array_equal(ev.annotations(2)["boxes"], [[x, y, x, y + h]])  # zero width, kept
    with pytest.warns(UserWarning, match="dropped 1 degenerate"):
        tr = CocoDetection(tmp_path / "train", path, train=True)
    assert tr.image_ids == [1, 5] and not tr.iscrowd.any() and tr.num_dropped_boxes == 1
    assert len(tr.annotations(0)["labels"]) == len(per_image[1]) - 1
    assert tr[0][1]["image_id"] == 1 and tr[1][1]["image_id"] == 5
    with pytest.warns(UserWarning):
        assert build_detection_dataset(str(tmp_path), "train", train=True).image_ids == [1, 5]
    assert build_detection_dataset(str(tmp_path), "train").image_ids == [1, 2, 3, 4, 5]


def test_voc_train_drops_degenerate_boxes_and_empty_images_keeps_difficult(tmp_path):
    root = export_voc(SyntheticDetection(4, 64, seed=3), tmp_path, "trainval")
    xmls = sorted((root / "Annotations").glob("*.xml"))
    text = xmls[1].read_text()
    xmin = text.split("<xmin>")
    xmls[1].write_text("<xmin>".join([xmin[0]] + ["300" + s[s.index("<"):] for s in xmin[1:]]))  # all outside
    xmls[2].write_text(xmls[2].read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    ev = VOCDetection(root, "trainval")
    assert ev.image_ids == [0, 1, 2, 3] and (ev.annotations(1)["boxes"][:, 0] == 299).all()  # as written
    with pytest.warns(UserWarning, match="degenerate"):
        tr = VOCDetection(root, "trainval", train=True)
    assert tr.image_ids == [0, 2, 3] and tr.num_dropped_boxes == len(ev.annotations(1)["labels"])
    assert tr.difficult.sum() == ev.difficult.sum() - ev.annotations(1)["difficult"].sum() > 0  # Detectron2


def test_coco_masks_polygons_and_rle_follow_the_boxes(tmp_path):
    from pycocotools import mask as mask_utils
    from torchvision import tv_tensors

    path, data, per_image, masks = _hand_made_coco(tmp_path)
    ev = CocoDetection(tmp_path / "train", path, masks=True)
    _, t = ev[0]
    assert isinstance(t["masks"], tv_tensors.Mask) and t["masks"].shape == (len(per_image[1]), 64, 64)
    np.testing.assert_array_equal(t["masks"][0].numpy(), masks[1][0])  # crowd: uncompressed RLE
    x, y, w, h = per_image[1][1]["bbox"]
    poly = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(per_image[1][1]["segmentation"], 64, 64)))
    np.testing.assert_array_equal(t["masks"][1].numpy(), poly)  # polygon
    np.testing.assert_array_equal(t["masks"][2:].numpy(), masks[1][2:])  # compressed RLE
    assert ev[3][1]["masks"].shape == (0, 64, 64)
    with pytest.warns(UserWarning, match="degenerate"):
        tr = CocoDetection(tmp_path / "train", path, train=True, masks=True,
                           transforms=detection_transforms(True, scales=(128,), max_size=1000, hflip=1.0))
    img, t = tr[1]  # image 5, resized x2 and flipped
    assert img.shape[-2:] == t["masks"].shape[-2:] == (128, 128) and len(t["masks"]) == len(t["boxes"])
    for box, m in zip(t["boxes"], t["masks"].bool()):
        ys, xs = torch.nonzero(m, as_tuple=True)
        tight = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        torch.testing.assert_close(tight, box.as_subclass(torch.Tensor), atol=2, rtol=0)
    assert "masks" not in CocoDetection(tmp_path / "train", path)[0][1]
    root = export_voc(SyntheticDetection(2, 64, seed=0), tmp_path / "voc")
    with pytest.raises(ValueError, match="no instance masks"):
        build_detection_dataset(str(root), "trainval", masks=True)


def test_coco_json_without_images_or_annotations_names_the_file(tmp_path):
    path = export_coco(SyntheticDetection(2, 64, seed=0), tmp_path, "train")
    data = json.loads(path.read_text())
    path.write_text(json.dumps([data]))
    with pytest.raises(ValueError, match=rf"{path}.*JSON list.*'images'"):
        CocoDetection(tmp_path / "train", path)
    for key in ("images", "annotations"):
        path.write_text(json.dumps({k: v for k, v in data.items() if k != key}))
        with pytest.raises(ValueError, match=rf"{path}.*no '{key}' list"):
            CocoDetection(tmp_path / "train", path)
    path.write_text(json.dumps(dict(data, images=[])))
    with pytest.raises(ValueError, match=rf"{path}.*no image"):
        CocoDetection(tmp_path / "train", path)
    path.write_text(json.dumps(dict(data, images=[{"id": 1, "file_name": "00000001.png"}])))
    with pytest.raises(ValueError, match=rf"image id 1 in {path}.*'height'"):
        CocoDetection(tmp_path / "train", path)


def test_empty_voc_split_names_the_file(tmp_path):
    root = export_voc(SyntheticDetection(2, 64, seed=0), tmp_path)
    split = root / "ImageSets" / "Main" / "test.txt"
    split.write_text("\n")
    with pytest.raises(ValueError, match=rf"{split}.*no image"):
        VOCDetection(root, "test")


def test_voc_class_list_does_not_depend_on_the_split(tmp_path):
    ds = SyntheticDetection(16, 64, seed=5)
    root = export_voc(ds, tmp_path, "trainval")
    stems = (root / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    without_circle = [s for i, s in enumerate(stems) if 1 not in ds.annotations(i)["labels"]]
    assert 0 < len(without_circle) < len(stems)
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(without_circle))
    test = VOCDetection(root, "test")  # no circle in this split: the labels must not shift
    assert test.classes == VOCDetection(root, "trainval").classes == SHAPES
    first = stems.index(without_circle[0])
    np.testing.assert_array_equal(test.annotations(0)["labels"], ds.annotations(first)["labels"])
    (tmp_path / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    assert VOCDetection(root, "test", classes=tmp_path / "classes.txt").classes == SHAPES
    assert build_detection_dataset(str(root), "test", classes=tmp_path / "classes.txt").classes == SHAPES
    (tmp_path / "classes.txt").write_text("\n".join(SHAPES[1:]))
    with pytest.raises(ValueError, match=r"circle.*classes\.txt"):
        VOCDetection(root, "trainval", classes=tmp_path / "classes.txt")


class _Labels:
    """A detection dataset reduced to what kshot_subset reads: classes, image ids, labels."""

    def __init__(self, labels, num_classes):
        self.labels, self.classes = labels, tuple(f"c{k}" for k in range(1, num_classes + 1))
        self.image_ids = [100 + i for i in range(len(labels))]

    def __len__(self):
        return len(self.labels)

    def annotations(self, i):
        return {"labels": np.asarray(self.labels[i], np.int64)}


def test_kshot_is_k_images_per_class():
    ds = SyntheticDetection(120, 64, seed=0)
    for k in (1, 5):
        ids = kshot_subset(ds, k, seed=1)
        assert len(ids) == len(set(ids)) == k * len(SHAPES)  # DAP: 5-shot on 80 classes = 400 images
        sub = subset_by_ids(ds, ids)
        per_class = Counter(int(c) for i in range(len(sub)) for c in np.unique(sub.annotations(i)["labels"]))
        assert all(per_class[c] >= k for c in range(1, 9))
    assert kshot_subset(ds, 5, seed=1) == kshot_subset(ds, 5, seed=1) != kshot_subset(ds, 5, seed=2)
    # class 2 only in images 0-1: served first (the rarest), so class 1 takes other images
    for seed in range(4):
        ids = kshot_subset(_Labels([[1, 2], [1, 2], [1], [1], [1]], 2), 2, seed)
        assert len(ids) == 4 and {100, 101} <= set(ids)
    with pytest.warns(UserWarning, match=r"c3"):  # the data does not allow 2 images of c3
        ids = kshot_subset(_Labels([[1], [1], [1], [2], [2], [2], [3]], 3), 2)
    assert len(ids) == 5 and 106 in ids


class _Built(Exception):
    """Raised by the stand-in for build_detection_dataset once the training set is asked for."""


# script, its argv, the function that builds the training set, the split that set is read from
_TRAINING_SETS = {
    "dap": ("dap", ["finetune", "--init", "x.pth"], lambda m, a, out: m.finetune_detector(a, None),
            lambda m, a: m.apply_protocol(a).train_split),
    "jigsaw_pretrain": ("jigsaw", [], lambda m, a, out: m.build_pretrain_data(a), lambda m, a: a.train_split),
    "jigsaw_finetune": ("jigsaw", ["--arch", "mask_rcnn"], lambda m, a, out: m.detection_data(a, None),
                        lambda m, a: a.train_split),
    "noisy_anchor": ("noisy_anchor", [], lambda m, a, out: m.build_datasets(a), lambda m, a: a.train_split),
    "soco": ("soco", [], lambda m, a, out: m.stage_finetune(a, None), lambda m, a: a.train_split or "train2017"),
    "ssod_certainty": ("ssod_certainty", [], lambda m, a, out: m.build_datasets(a), lambda m, a: a.train_split),
    "analysis_finetune": ("det_pretrain_analysis", [], lambda m, a, out: m.finetune_detection(a, None, None, out),
                          lambda m, a: a.det_train_split),
    "analysis_removal": ("det_pretrain_analysis", ["--remove-categories", "circle"],
                         lambda m, a, out: m.run_removal(a, None, {}, out, set()), lambda m, a: a.pretrain_split),
}


@pytest.mark.parametrize("case", sorted(_TRAINING_SETS))
def test_every_script_builds_its_training_set_with_train_true(case, tmp_path, monkeypatch):
    """Crowd boxes and images without a usable box stay out of every script's training set: the
    call that reads the training split passes train=True (and masks=True for Mask R-CNN)."""
    import importlib

    import common.data

    name, argv, run, split_of = _TRAINING_SETS[case]
    module = importlib.import_module(name)
    out_flag = "--output-dir" if name in ("noisy_anchor", "ssod_certainty") else "--out"
    parse = getattr(module, "parse_args", None) or (lambda argv: module.get_args_parser().parse_args(argv))
    args = parse([*argv, out_flag, str(tmp_path)])
    train_split = split_of(module, parse([*argv, out_flag, str(tmp_path)]))
    real, calls = common.data.build_detection_dataset, []

    def build(data, split, *a, **kw):
        calls.append((split, kw.get("train", False), kw.get("masks", False)))
        if split == train_split:
            raise _Built
        return real(data, split, *a, **kw)

    monkeypatch.setattr(common.data, "build_detection_dataset", build)  # jigsaw reads it as cdata.<name>
    if hasattr(module, "build_detection_dataset"):
        monkeypatch.setattr(module, "build_detection_dataset", build)
    with pytest.raises(_Built):
        run(module, args, tmp_path)
    # Mask R-CNN reads COCO's masks: jigsaw --arch mask_rcnn, soco's default --det-arch mask_rcnn_fpn (Tables 1-2)
    assert calls[-1] == (train_split, True, case in ("jigsaw_finetune", "soco"))


class _PidAndDraw(torch.utils.data.Dataset):
    """Item i -> (i, the worker's pid, a random draw): which process served it, and its augmentation."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return i, os.getpid(), float(torch.rand(()))


def test_persistent_workers_live_across_epochs_and_see_set_epoch():
    from common.data import build_loader, collate_detection, set_epoch

    def epoch(loader, e):
        set_epoch(loader, e)
        items = [x for idx, pid, draw in loader for x in zip(idx, pid, draw)]
        return {i: d for i, _, d in items}, {p for _, p, _ in items}

    kw = dict(train=True, seed=0, collate_fn=collate_detection, group_by_aspect_ratio=False)
    loader = build_loader(_PidAndDraw(), 4, workers=2, persistent_workers=True, **kw)
    (d0, p0), (d1, p1) = epoch(loader, 0), epoch(loader, 1)
    assert p0 == p1 and os.getpid() not in p0  # the same two worker processes serve both epochs
    reference = build_loader(_PidAndDraw(), 4, workers=0, **kw)
    assert (d0, d1) == (epoch(reference, 0)[0], epoch(reference, 1)[0])  # each epoch's own augmentation
    assert d0 != d1
