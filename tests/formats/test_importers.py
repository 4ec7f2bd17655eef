"""Each importer on a fixture in its dataset's published layout, with the exact rendered text and
box numbers — traps included: xywh vs xyxy, RefCOCO file names with an annotation suffix, several
sentences per ref, GRIT chunks that overlap, illegible TextOCR words, unicode captions.

A format description is not enough (qvl once read TextOCR's ``imgToAnns`` as ``img2Anns``): each
fixture is written from code that reads the real published file — the dataset's own API or a
widely used loader, named in a comment above it — with every top-level key that file has, the
same types (int or string ids, lists or dicts) and the same file naming."""

from __future__ import annotations

import io
import itertools
import json
import pickle
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from qvl.cli import app
from qvl.formats import importers
from qvl.formats.build import FormatSettings, run_format
from qvl.formats.importers import LayoutFileError
from qvl.formats.tokenizers import load_tokenizer
from tests.conftest import needs_shared_data

runner = CliRunner()


def image(root: Path, name: str, size=(64, 48)) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(path)


def rendered(tmp_path: Path, layout: str, files: list[Path], images: Path | None = None, downloads=None,
             **kw) -> tuple[dict[str, str], list[dict], dict]:
    """id -> decoded sample text (bytes tokenizer), the rejects, the manifest."""
    out = tmp_path / f"out-{layout}-{len(list(tmp_path.glob('out-*')))}"
    records = ((f, i, f"{Path(f).name}:{i}", r) for f, i, r in importers.records(layout, files, **kw))
    manifest = run_format("multitask", files, out, images, downloads, records=records, show_progress=False,
                          settings=FormatSettings(tokenizer="bytes", image_tokens=4))
    import datasets

    tok = load_tokenizer("bytes")
    rows = datasets.load_from_disk(str(out)).with_format(None)
    texts = {row["id"]: tok.decode(row["input_ids"]) for row in rows}
    return texts, pq.read_table(out / "rejects.parquet").to_pylist(), manifest


COCO_LICENSES = [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
                  "name": "Attribution-NonCommercial-ShareAlike License"}]


def coco_image(image_id: int, split: str, width: int, height: int) -> dict:
    """An ``images`` entry as COCO publishes it (2014 names; 2017 names are ``%012d.jpg``)."""
    name = f"COCO_{split}_{image_id:012d}.jpg"
    return {"license": 1, "file_name": name, "coco_url": f"http://images.cocodataset.org/{split}/{name}",
            "height": height, "width": width, "date_captured": "2013-11-14 16:28:13",
            "flickr_url": "http://farm4.staticflickr.com/3153/2970773875_164f0c0b83_z.jpg", "id": image_id}


def test_coco_captions(tmp_path):
    image(tmp_path / "img", "COCO_train2014_000000581857.jpg")
    # as cocodataset/cocoapi PythonAPI/pycocotools/coco.py reads it (images by id, annotations by image_id)
    data = {"info": {"description": "COCO 2014 Dataset", "url": "http://cocodataset.org", "version": "1.0",
                     "year": 2014, "contributor": "COCO Consortium", "date_created": "2017/09/01"},
            "images": [coco_image(581857, "train2014", 640, 480)],
            "licenses": COCO_LICENSES,
            "annotations": [{"image_id": 581857, "id": 1, "caption": "A man riding a wave on a surfboard."},
                            {"image_id": 581857, "id": 2, "caption": "Ünïcode café surfer"},
                            {"image_id": 999, "id": 3, "caption": "an orphan caption"}]}
    (tmp_path / "captions_train2014.json").write_text(json.dumps(data))
    texts, rejects, _ = rendered(tmp_path, "coco-captions", [tmp_path / "captions_train2014.json"], tmp_path / "img")
    assert texts == {
        "coco-caption:1": "<img></img>Generate the caption in English: A man riding a wave on a surfboard.<|endoftext|>",
        "coco-caption:2": "<img></img>Generate the caption in English: Ünïcode café surfer<|endoftext|>"}
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "missing_image")]


VQA_INFO = {"description": "This is v2.0 of the VQA dataset.", "url": "http://visualqa.org", "version": "2.0",
            "year": 2017, "contributor": "VQA Team", "date_created": "2017-04-26 17:07:13"}
VQA_LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons Attribution 4.0"}


def test_vqav2_gqa_textvqa(tmp_path):
    root = tmp_path / "img"
    for name in ("COCO_val2014_000000000042.jpg", "n161313.jpg", "0054c91397f2fe05.jpg"):
        image(root, name)
    # as GT-Vision-Lab/VQA PythonHelperTools/vqaTools/vqa.py reads them (image names: PythonHelperTools/vqaDemo.py)
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({
        "info": VQA_INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": VQA_LICENSE,
        "data_subtype": "val2014", "questions": [
            {"image_id": 42, "question": "What is the man holding?", "question_id": 420}]}))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({
        "info": VQA_INFO, "license": VQA_LICENSE, "data_subtype": "val2014", "annotations": [
            {"question_type": "what is the", "multiple_choice_answer": "surfboard",
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                         for k, a in enumerate(["surfboard"] * 8 + ["board", "surf board"])],
             "image_id": 42, "answer_type": "other", "question_id": 420}],
        "data_type": "mscoco"}))
    texts, _, _ = rendered(tmp_path, "vqav2", [tmp_path / "v2_mscoco_val2014_annotations.json",
                                               tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"], root)
    assert texts == {"vqav2:420": "<img></img> What is the man holding? Answer: surfboard<|endoftext|>"}
    # as MILVLG/openvqa openvqa/datasets/gqa/gqa_loader.py reads it (a dict by question id; imageId, answer)
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps({"201307251": {
        "semantic": [{"operation": "select", "dependencies": [], "argument": "scene"},
                     {"operation": "verify weather", "dependencies": [0], "argument": "overcast"}],
        "entailed": ["201307250"], "equivalent": ["201307251"], "question": "Is it overcast?",
        "imageId": "n161313", "isBalanced": True, "groups": {"global": None, "local": "06-weather_overcast"},
        "answer": "no", "semanticStr": "select: scene->verify weather: overcast [0]",
        "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
        "types": {"detailed": "weatherVerify", "semantic": "global", "structural": "verify"},
        "fullAnswer": "No, it is clear."}}))
    texts, _, _ = rendered(tmp_path, "gqa", [tmp_path / "testdev_balanced_questions.json"], root)
    assert texts == {"gqa:201307251": "<img></img> Is it overcast? Answer: no<|endoftext|>"}
    # as huggingface/datasets datasets/textvqa/textvqa.py reads it ('data'; image train_images/{image_id}.jpg)
    (tmp_path / "TextVQA_0.5.1_train.json").write_text(json.dumps({
        "dataset_type": "train", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [{
            "question": "what is the brand of this phone?", "image_id": "0054c91397f2fe05",
            "image_classes": ["Mobile phone", "Telephone"],
            "flickr_original_url": "https://farm6.staticflickr.com/2891/9134076951_f65b421097_o.jpg",
            "flickr_300k_url": "https://c4.staticflickr.com/3/2891/9134076951_9db89d3e0f_z.jpg",
            "image_width": 1024, "image_height": 730,
            "answers": ["toshiba", "nokia", "nokia", "toshiba", "nokia", "nokia", "unanswerable", "nokia", "nokia",
                        "nokia"],
            "question_tokens": ["what", "is", "the", "brand", "of", "this", "phone"], "question_id": 34602,
            "set_name": "train"}]}))
    texts, _, _ = rendered(tmp_path, "textvqa", [tmp_path / "TextVQA_0.5.1_train.json"], root)
    assert texts == {"textvqa:34602": "<img></img> what is the brand of this phone? Answer: nokia<|endoftext|>"}


def py2_pickle(obj) -> bytes:
    """``obj`` as Python 2's ``cPickle.dump`` writes it by default (protocol 0: text opcodes, ``str``
    as ``S'...'``), the way the refer API's ``refs(*).p`` were made."""
    out, memo = [], itertools.count()

    def emit(value) -> None:
        if isinstance(value, bool):
            out.append(f"I0{int(value)}\n")
        elif isinstance(value, int):
            out.append(f"I{value}\n")
        elif isinstance(value, float):
            out.append(f"F{value!r}\n")
        elif isinstance(value, str):
            out.append(f"S{value!r}\np{next(memo)}\n")
        elif isinstance(value, list):
            out.append(f"(lp{next(memo)}\n")
            for item in value:
                emit(item)
                out.append("a")
        else:
            out.append(f"(dp{next(memo)}\n")
            for key, item in value.items():
                emit(key)
                emit(item)
                out.append("s")

    emit(obj)
    return ("".join(out) + ".").encode("latin-1")


def sentence(sent_id: int, sent: str) -> dict:
    return {"tokens": sent.split(), "raw": sent.upper(), "sent_id": sent_id, "sent": sent}


def refcoco_files(tmp_path: Path) -> list[Path]:
    # as lichengunc/refer refer.py reads them (refs by ref_id, ann_id -> instances' annotation, image_id -> image)
    refs = [
        {"sent_ids": [0, 1], "file_name": "COCO_train2014_000000581857_16.jpg",  # image 581857 + annotation suffix
         "ann_id": 1719310, "ref_id": 0, "image_id": 581857, "split": "train",
         "sentences": [sentence(0, "the lady with the blue shirt"), sentence(1, "lady w back to us")],
         "category_id": 1},
        {"sent_ids": [2], "file_name": "COCO_train2014_000000581857_17.jpg", "ann_id": 1719310, "ref_id": 1,
         "image_id": 581857, "split": "testA", "sentences": [sentence(2, "not in train")], "category_id": 1},
        {"sent_ids": [3], "file_name": "COCO_train2014_000000581857_18.jpg", "ann_id": 1719310, "ref_id": 2,
         "image_id": 581857, "split": "testB", "sentences": [sentence(3, "in testB")], "category_id": 1},
    ]
    (tmp_path / "refs(unc).p").write_bytes(py2_pickle(refs))
    (tmp_path / "instances.json").write_text(json.dumps({
        "info": {"description": "This is stable 1.0 version of the 2014 MS COCO dataset.", "version": "1.0",
                 "year": 2014},
        "images": [coco_image(581857, "train2014", 640, 427)],
        "licenses": COCO_LICENSES,
        "annotations": [{"segmentation": [[103.93, 200.0, 238.15, 200.0, 238.15, 377.42, 103.93, 377.42]],
                         "area": 23813.46, "iscrowd": 0, "image_id": 581857,
                         "bbox": [103.93, 200.0, 134.22, 177.42], "category_id": 1, "id": 1719310}],
        "categories": [{"supercategory": "person", "id": 1, "name": "person"}]}))
    return [tmp_path / "refs(unc).p", tmp_path / "instances.json"]


def test_refcoco_xywh_suffixed_names_and_several_sentences(tmp_path):
    image(tmp_path / "img", "COCO_train2014_000000581857.jpg", (640, 427))
    texts, rejects, _ = rendered(tmp_path, "refcoco", refcoco_files(tmp_path), tmp_path / "img")
    # xywh [103.93, 200, 134.22, 177.42] is xyxy (103.93, 200, 238.15, 377.42) on 640x427:
    # int(103.93/640*1000)=162, int(200/427*1000)=468, int(238.15/640*1000)=372, int(377.42/427*1000)=883
    box = "<box>(162,468),(372,883)</box>"
    assert texts == {
        "refcoco:0:0": f"<img></img><ref>the lady with the blue shirt</ref>{box}<|endoftext|>",
        "refcoco:0:0:caption": f"<img></img><ref>This</ref>{box} is the lady with the blue shirt<|endoftext|>",
        "refcoco:0:1": f"<img></img><ref>lady w back to us</ref>{box}<|endoftext|>",
        "refcoco:0:1:caption": f"<img></img><ref>This</ref>{box} is lady w back to us<|endoftext|>"}
    assert rejects == []
    texts, _, _ = rendered(tmp_path, "refcoco", refcoco_files(tmp_path), tmp_path / "img", split="testA",
                           tasks=["ref_grounding"])
    assert list(texts) == ["refcoco:1:2"]


@needs_shared_data
def test_refcoco_on_real_coco_instances(shared_data, tmp_path):
    """COCO's own annotations of image 39769 (640x480) as instances.json holds them, boxes xywh."""
    annotations = json.loads((shared_data / "external" / "coco_39769" / "coco_annotations.txt").read_text())
    image(tmp_path / "img", "000000039769.jpg", (640, 480))
    refs = [{"sent_ids": [0], "file_name": "COCO_train2014_000000039769_1108446.jpg", "ann_id": 1108446, "ref_id": 0,
             "image_id": 39769, "split": "train", "sentences": [sentence(0, "remote on the right")],
             "category_id": 75}]
    (tmp_path / "refs(unc).p").write_bytes(py2_pickle(refs))
    (tmp_path / "instances.json").write_text(json.dumps({
        "info": {}, "images": [{**coco_image(39769, "val2017", 640, 480), "file_name": "000000039769.jpg"}],
        "licenses": COCO_LICENSES, "annotations": annotations,
        "categories": [{"supercategory": "electronic", "id": 75, "name": "remote"}]}))
    texts, rejects, _ = rendered(tmp_path, "refcoco", [tmp_path / "refs(unc).p", tmp_path / "instances.json"],
                                 tmp_path / "img", tasks=["ref_grounding"])
    # bbox [332.89, 79.57, 38.65, 106.31] -> xyxy (332.89, 79.57, 371.54, 185.88) on 640x480
    assert texts == {"refcoco:0:0": "<img></img><ref>remote on the right</ref><box>(520,165),(580,387)</box>"
                                    "<|endoftext|>"}
    assert rejects == []


def test_refcoco_splits_as_the_refer_api_chooses_them(tmp_path):
    """``REFER.getRefIds(split='test')`` is testA and testB together; a name it does not know it refuses."""
    image(tmp_path / "img", "COCO_train2014_000000581857.jpg", (640, 427))
    texts, _, _ = rendered(tmp_path, "refcoco", refcoco_files(tmp_path), tmp_path / "img", split="test",
                           tasks=["ref_grounding"])
    assert sorted(texts) == ["refcoco:1:2", "refcoco:2:3"]
    with pytest.raises(LayoutFileError, match="--split 'dev': not a split of refcoco; one of train, val, test"):
        importers.records("refcoco", refcoco_files(tmp_path), split="dev")  # before any file is read
    with pytest.raises(LayoutFileError, match="--split 'val': gqa has no splits to choose from"):
        importers.records("gqa", [tmp_path / "gqa.json"], split="val")


def test_refcoco_pickle_that_calls_a_function_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo owned",))

    files = refcoco_files(tmp_path)
    files[0].write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(LayoutFileError, match=r"refs\(unc\).p: not a plain refs pickle .*refuses opcode (STACK_GLOBAL|GLOBAL)"):
        list(importers.records("refcoco", files))


def test_visual_genome_regions(tmp_path):
    image(tmp_path / "img", "VG_100K_2/1.jpg", (800, 600))
    # as ranjaykrishna/visual_genome_python_driver visual_genome/local.py + utils.py read them (VG 1.2)
    (tmp_path / "region_descriptions.json").write_text(json.dumps([{"regions": [
        {"region_id": 1382, "width": 82, "height": 139, "image_id": 1, "phrase": "the clock is green in colour",
         "y": 57, "x": 421},
        {"region_id": 1383, "width": 500, "height": 50, "image_id": 1, "phrase": "far off the edge", "y": 10,
         "x": 700}], "id": 1}]))
    (tmp_path / "image_data.json").write_text(json.dumps([{
        "width": 800, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", "height": 600, "image_id": 1,
        "coco_id": None, "flickr_id": None}]))
    texts, rejects, _ = rendered(tmp_path, "visual-genome", [tmp_path / "region_descriptions.json",
                                                             tmp_path / "image_data.json"], tmp_path / "img")
    # xywh (421, 57, 82, 139) -> xyxy (421, 57, 503, 196) on 800x600 -> (526,95),(628,326)
    assert texts["vg:1382"] == "<img></img><ref>the clock is green in colour</ref><box>(526,95),(628,326)</box><|endoftext|>"
    assert texts["vg:1382:caption"].endswith("</box> is the clock is green in colour<|endoftext|>")
    assert {r["reason"] for r in rejects} == {"bad_box"} and len(rejects) == 2  # x + w = 1200 > 800


def test_visual_genome_1_0_ids(tmp_path):
    """VG 1.0 names an image ``id`` and a region ``id``: the driver reads both (``region_id`` else ``id``)."""
    image(tmp_path / "img", "VG_100K/10.jpg", (800, 600))
    (tmp_path / "region_descriptions.json").write_text(json.dumps([{"regions": [
        {"id": 77, "width": 82, "height": 139, "phrase": "a green clock", "y": 57, "x": 421}],
        "id": 10}]))
    (tmp_path / "image_data.json").write_text(json.dumps([{
        "width": 800, "url": "https://cs.stanford.edu/people/rak248/VG_100K/10.jpg", "height": 600, "id": 10,
        "coco_id": None, "flickr_id": 123}]))
    texts, rejects, _ = rendered(tmp_path, "visual-genome", [tmp_path / "region_descriptions.json",
                                                             tmp_path / "image_data.json"], tmp_path / "img")
    assert texts["vg:77"] == "<img></img><ref>a green clock</ref><box>(526,95),(628,326)</box><|endoftext|>"
    assert rejects == []


def test_grit_overlapping_chunks_normalised_boxes_and_downloads(tmp_path):
    url = "https://grit.example/images/0001.jpg"
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (500, 400), "white").save(buf, "JPEG")
    with tarfile.open(downloads / "00000.tar", "w") as tar:
        info = tarfile.TarInfo("000000000.jpg")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    pq.write_table(pa.table({"url": [url], "key": ["000000000"], "status": ["success"]}), downloads / "00000.parquet")
    chunk = pa.list_(pa.float64())
    # as microsoft/unilm kosmos-2/data/visualize_grit.py reads a row ([start, end, x1, y1, x2, y2, score], boxes
    # normalised), in the columns of Hugging Face zzliang/GRIT grit-20m/coyo_*_snappy.parquet (no key: COYO's id)
    pq.write_table(pa.table({
        "clip_similarity_vitb32": [0.353271484375], "clip_similarity_vitl14": [0.2958984375],
        "id": pa.array([1795296605919], pa.int64()), "url": [url], "caption": ["a dog and a cat on a sofa"],
        "width": pa.array([500], pa.int64()), "height": pa.array([400], pa.int64()),
        "noun_chunks": pa.array([[[0, 5, 0.125, 0.25, 0.5, 0.75, 0.9], [2, 5, 0.2, 0.2, 0.4, 0.4, 0.5],
                                  [10, 15, 0.5, 0.5, 0.875, 0.875, 0.8], [10, 15, 0.625, 0.625, 1.0, 1.0, 0.7]]],
                                pa.list_(chunk)),
        "ref_exps": pa.array([[[10, 15, 0.5, 0.5, 0.875, 0.875, 0.8]]], pa.list_(chunk))}),
        tmp_path / "coyo_0_snappy.parquet")
    texts, rejects, _ = rendered(tmp_path, "grit", [tmp_path / "coyo_0_snappy.parquet"], downloads=downloads)
    # "dog" [2, 5] overlaps "a dog" [0, 5] and is less confident: dropped; "a cat" keeps both its boxes
    assert texts["grit:1795296605919"] == (
        "<img></img>Generate the caption in English with grounding: <ref>a dog</ref><box>(125,250),(500,750)</box>"
        " and <ref>a cat</ref><box>(500,500),(875,875)</box><box>(625,625),(999,999)</box> on a sofa<|endoftext|>")
    assert texts["grit:1795296605919:ref0"] == \
        "<img></img><ref>a cat</ref><box>(500,500),(875,875)</box><|endoftext|>"
    assert rejects == []
    # the release's grit_coyo.jsonl, as visualize_grit.py reads it: one row a line, with COYO's file name as key
    row = pq.read_table(tmp_path / "coyo_0_snappy.parquet").to_pylist()[0]
    (tmp_path / "grit_coyo.jsonl").write_text(json.dumps({"key": "000373938", **row}) + "\n" + "{\"key\": 1\n")
    again, rejects, _ = rendered(tmp_path, "grit", [tmp_path / "grit_coyo.jsonl"], downloads=downloads)
    assert again == {k.replace("1795296605919", "000373938"): v for k, v in texts.items()}
    assert [(r["line"], r["reason"]) for r in rejects] == [(1, "malformed_json")]


def word(ann_id: str, text: str, points: list) -> dict:
    xs, ys = points[0::2], points[1::2]
    bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return {"id": ann_id, "image_id": ann_id.split("_")[0], "bbox": bbox, "utf8_string": text, "points": points,
            "area": bbox[2] * bbox[3]}


def test_textocr_quads_and_illegible_words(tmp_path):
    image(tmp_path / "img", "a1.jpg", (1024, 768))  # TextVQA's train_images/ (the file says train/a1.jpg)
    words = [word("a1_1", "STOP", [100, 100, 300, 100, 300, 200, 100, 200]), word("a1_2", ".", [1, 1, 2, 1, 2, 2, 1, 2]),
             word("a1_3", "Café", [10, 10, 60, 12, 62, 40, 30, 45, 8, 38]), word("a2_1", ".", [1, 1, 2, 1, 2, 2, 1, 2])]
    # as mindspore-lab/mindocr tools/dataset_converters/textocr.py reads it (imgs, imgToAnns, anns; image by name)
    (tmp_path / "TextOCR_0.1_train.json").write_text(json.dumps({
        "info": {"description": "TextOCR", "version": "0.1"},
        "imgs": {"a1": {"id": "a1", "width": 1024, "height": 768, "set": "train", "file_name": "train/a1.jpg"},
                 "a2": {"id": "a2", "width": 10, "height": 10, "set": "train", "file_name": "train/a2.jpg"}},
        "anns": {w["id"]: w for w in words},
        "imgToAnns": {"a1": ["a1_1", "a1_2", "a1_3"], "a2": ["a2_1"]}}))
    texts, rejects, manifest = rendered(tmp_path, "textocr", [tmp_path / "TextOCR_0.1_train.json"], tmp_path / "img")
    # a five-point polygon becomes its bounding box's corners: x 8..62, y 10..45
    assert texts == {"textocr:a1": "<img></img>OCR with grounding:<ref>STOP</ref><quad>(97,130),(292,130),(292,260),"
                                   "(97,260)</quad><ref>Café</ref><quad>(7,13),(60,13),(60,58),(7,58)</quad>"
                                   "<|endoftext|>"}
    assert manifest["records"] == 1  # the image with only illegible words gives no sample
    data = json.loads((tmp_path / "TextOCR_0.1_train.json").read_text())
    data["img2Anns"] = data.pop("imgToAnns")  # a name no released file uses
    (tmp_path / "TextOCR_0.1_train.json").write_text(json.dumps(data))
    with pytest.raises(LayoutFileError, match="TextOCR_0.1_train.json: a TextOCR file holds 'imgs', 'anns' and "
                                              "'imgToAnns'"):
        list(importers.records("textocr", [tmp_path / "TextOCR_0.1_train.json"]))


def test_a_textocr_file_name_that_names_no_file_is_a_reject(tmp_path):
    (tmp_path / "TextOCR_0.1_val.json").write_text(json.dumps({
        "info": {}, "imgs": {"b1": {"id": "b1", "width": 64, "height": 48, "set": "val", "file_name": "train/.."}},
        "anns": {"b1_1": word("b1_1", "EXIT", [1, 1, 30, 1, 30, 20, 1, 20])}, "imgToAnns": {"b1": ["b1_1"]}}))
    [(_, _, error)] = list(importers.records("textocr", [tmp_path / "TextOCR_0.1_val.json"]))
    assert error.reason == "bad_field" and "names no file" in str(error)


def test_llava_pretrain_captions_and_the_cli(tmp_path):
    image(tmp_path / "img", "00453/004539375.jpg")
    # as haotian-liu/LLaVA llava/train/train.py reads it (LazySupervisedDataset: image under the folder; preprocess_plain)
    (tmp_path / "blip_laion_cc_sbu_558k.json").write_text(json.dumps([
        {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]},
        {"id": "broken", "conversations": []}]))
    result = runner.invoke(app, ["format", "multitask", "--from", "llava-pretrain",
                                 str(tmp_path / "blip_laion_cc_sbu_558k.json"), "--images", str(tmp_path / "img"),
                                 "--out", str(tmp_path / "o"), "--tokenizer", "bytes", "--image-tokens", "4",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["samples"] == 1 and manifest["rejected"] == 1
    assert manifest["by_source"] == {"llava-pretrain": {"caption": {"samples": 1, "tokens": manifest["tokens"]}}}
    bad = runner.invoke(app, ["format", "multitask", "--from", "coco", str(tmp_path / "x.json"), "--out",
                              str(tmp_path / "o2")])
    assert bad.exit_code == 1 and "unknown layout" in bad.output
    bad = runner.invoke(app, ["format", "multitask", "--from", "gqa", str(tmp_path / "x.json"), "--task", "ocr",
                              "--out", str(tmp_path / "o3")])
    assert bad.exit_code == 1 and "--from gqa: gqa gives vqa, not ocr" in bad.output


def test_mix_draws_each_source_its_share_deterministically(tmp_path):
    root = tmp_path / "data"
    image(root / "coco", "COCO_train2014_000000581857.jpg")
    image(root / "gqa", "n1.jpg")
    (tmp_path / "captions.json").write_text(json.dumps({
        "images": [{"id": 581857, "file_name": "COCO_train2014_000000581857.jpg"}],
        "annotations": [{"id": i, "image_id": 581857, "caption": f"a surfer on wave number {i}"} for i in range(2)]}))
    (tmp_path / "gqa.json").write_text(json.dumps({str(i): {"imageId": "n1", "question": f"Question {i}?",
                                                           "answer": "yes"} for i in range(40)}))
    (tmp_path / "mix.toml").write_text(f"""
[mix]
seed = 3
tokenizer = "bytes"
image_tokens = 4
pack_to = 512

[[source]]
name = "captions"
layout = "coco-captions"
files = ["{tmp_path / 'captions.json'}"]
images = "{root / 'coco'}"
count = 5

[[source]]
name = "gqa"
layout = "gqa"
files = ["{tmp_path / 'gqa.json'}"]
images = "{root / 'gqa'}"
fraction = 0.5
""")
    result = runner.invoke(app, ["format", "mix", str(tmp_path / "mix.toml"), "--out", str(tmp_path / "m1"),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "m1" / "manifest.json").read_text())
    assert manifest["mix"]["available"] == {"captions": 2, "gqa": 40} and manifest["mix"]["asked"] == \
        {"captions": 5, "gqa": 20}
    by_source = manifest["by_source"]
    assert 4 <= by_source["captions"]["caption"]["samples"] <= 6  # each caption twice, a third copy with p = 0.5
    assert 10 <= by_source["gqa"]["vqa"]["samples"] <= 30 and manifest["rejected"] == 0
    assert set(manifest["by_task"]) == {"caption", "vqa"} and manifest["packing"]["efficiency"] > 0.5
    again = runner.invoke(app, ["format", "mix", str(tmp_path / "mix.toml"), "--out", str(tmp_path / "m2"),
                                "--no-progress"])
    assert again.exit_code == 0
    second = json.loads((tmp_path / "m2" / "manifest.json").read_text())
    assert second["by_source"] == by_source  # the same draw from the same seed


@pytest.mark.parametrize("pickle_bytes, said", [
    (b"\x80\x02]r\xff\xff\xff\xff.", "memo index 4294967295"),  # CPython sized its memo to 32 GB: MemoryError
    (b"\x80\x04\x8e" + b"\xff" * 8 + b".", "bytes8"),  # OverflowError traceback
])
def test_a_refs_pickle_asking_for_absurd_memory_is_refused_unread(tmp_path, pickle_bytes, said):
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle_bytes)
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(LayoutFileError, match=said):
        list(importers.records("refcoco", [refs, instances]))


@pytest.mark.parametrize("layout, name, content", [
    ("gqa", "val_balanced_questions.json", "[1, 2]"),  # read as holding no question, exit 0
    ("llava-pretrain", "blip_laion_cc_sbu_558k.json", '{"a": {"id": "1", "image": "a.jpg", "conversations": []}}'),
])
def test_a_streamed_file_of_another_top_level_is_refused_not_read_as_empty(tmp_path, layout, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LayoutFileError, match="top level"):
        list(importers.records(layout, [path]))


def test_a_limit_below_one_is_refused(tmp_path):
    """--limit -3 gave an empty output, exit 0."""
    path = tmp_path / "q.json"
    path.write_text("{}")
    with pytest.raises(LayoutFileError, match="--limit -3"):
        list(importers.records("gqa", [path], limit=-3))
