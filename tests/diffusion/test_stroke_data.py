"""sparse_diffusion.data: the stroke loaders (SVG paths, KanjiVG, QuickDraw, VMNIST) on small fixture
files, plus the installed KanjiVG."""
import io
import json
import os
import pickle
import re
import shlex
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from sparse_diffusion.data import (
    DatasetFormatError,
    KanjiVG,
    QuickDraw,
    VMNIST,
    get_dataset,
    parse_svg_path,
    parse_svg_strokes,
    resample_strokes,
    strokes_to_points,
)
from sparse_diffusion.data.stroke_datasets import kanjivg_dir, read_npz
from sparse_diffusion.data.strokes import stroke3_to_strokes


def check_stroke_item(item, max_len, strokes=None):
    """Shape, dtype, padding, pen flags and normalisation of a stroke item."""
    points, length = item
    assert points.shape == (max_len, 3) and points.dtype == torch.float32
    assert length.dtype == torch.int64 and length.dim() == 0
    n = int(length)
    assert 1 <= n <= max_len
    assert torch.all(points[n:] == 0)
    pen = points[:n, 2]
    assert set(pen.tolist()) <= {0.0, 1.0} and pen[-1] == 1
    if strokes is not None:
        assert int(pen.sum()) == strokes
    xy = points[:n, :2].double()
    assert torch.allclose(xy.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-5)
    assert abs(float(xy.std(unbiased=False)) - 1.0) < 1e-5
    return points[:n].numpy()


def split_at_pens(points):
    ends = np.flatnonzero(points[:, 2] == 1) + 1
    return np.split(points[:, :2], ends)[:-1]


# --------------------------------------------------------------------------- SVG and strokes
SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="109" height="109" viewBox="0 0 109 109">
<g id="kvg:StrokePaths_test">{}</g></svg>"""


def write_svg(path, *ds):
    paths = "".join(f'<path id="kvg:test-s{k + 1}" d="{d}"/>' for k, d in enumerate(ds))
    path.write_text(SVG.format(paths))
    return str(path)


def near(points, xy):
    return np.min(np.hypot(*(points - np.asarray(xy)).T)) < 1e-9


def test_svg_commands(tmp_path):
    file = write_svg(
        tmp_path / "a.svg",
        "M10,10 L20,10 l0,10",                       # absolute and relative lines
        "M10,30c5,0,10,5,10,10s5,10,10,10",          # relative cubic and smooth cubic
        "m40,40 C50,40 60,50 60,60 S70,80 80,80 z",  # absolute C, S and closepath
        "M0,0 L10,0 L10,10 Z M20,20 L30,30",        # two subpaths: two strokes
    )
    s = parse_svg_strokes(file)
    assert len(s) == 5 and all(x.ndim == 2 and x.shape[1] == 2 for x in s)
    assert np.allclose(s[0][[0, -1]], [[10, 10], [20, 20]]) and near(s[0], (20, 10))
    assert np.allclose(s[1][[0, -1]], [[10, 30], [30, 50]])
    # s reflects the control point (20, 35) about (20, 40): B(0.5) of (20,40) (20,45) (25,50) (30,50)
    assert near(s[1], (23.125, 46.875)) and near(s[1], (20, 40))
    assert np.allclose(s[2][[0, -1]], [[40, 40], [40, 40]]) and near(s[2], (80, 80))
    assert np.allclose(s[3][[0, -1]], [[0, 0], [0, 0]]) and np.allclose(s[4][[0, -1]], [[20, 20], [30, 30]])
    assert np.allclose(parse_svg_path("M1-2l3-4")[0][[0, -1]], [[1, -2], [4, -6]])
    assert np.allclose(parse_svg_path("M.5.5L1e1,2E0")[0][[0, -1]], [[0.5, 0.5], [10, 2]])


@pytest.mark.parametrize("d", ["M10,10 c1,2,3", "M10,10 Q1,2,3,4", "M10,10 c1,2,3,4,5,x6", "5,5 L1,1", "M1,1"])
def test_malformed_svg_path_names_file_and_id(tmp_path, d):
    file = write_svg(tmp_path / "bad.svg", "M1,1 L2,2", d)
    with pytest.raises(DatasetFormatError, match=re.escape(file) + ".*kvg:test-s2"):
        parse_svg_strokes(file)


def test_kanjivg_fixture_folder(tmp_path):
    for k in range(13):  # 0000c.svg is the first name that kanjivg_split sends to "test"
        write_svg(tmp_path / f"0{k:04x}.svg", "M10,10 L90,10", f"M{10 + k},20c0,20,5,40,30,60")
    train, test = KanjiVG("train", svg_dir=str(tmp_path)), KanjiVG("test", svg_dir=str(tmp_path))
    assert (len(train), len(test)) == (12, 1) and train.num_classes is None and train.kind == "stroke"
    item = train[0]
    check_stroke_item(item, 64, strokes=2)
    assert all(torch.equal(a, b) for a, b in zip(item, train[0]))  # cached and unchanged


def test_kanjivg_empty_split_raises(tmp_path):
    for k in range(3):  # all three names go to "train"
        write_svg(tmp_path / f"0{k:04x}.svg", "M10,10 L90,10")
    assert len(KanjiVG("train", svg_dir=str(tmp_path))) == 3
    with pytest.raises(ValueError) as e:
        KanjiVG("test", svg_dir=str(tmp_path))
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value) and "holds 3 .svg files" in str(e.value)


def test_pen_flags_padding_and_normalisation():
    strokes = [np.array([[0.0, y], [10.0, y]]) for y in (0.0, 5.0, 10.0)] + [np.array([[3.0, 3.0]])]
    points = check_stroke_item(strokes_to_points(strokes, max_len=96, spacing=0.1), 96, strokes=4)
    pieces = split_at_pens(points)
    assert len(pieces) == 4 and len(pieces[3]) == 1
    for piece in pieces[:3]:  # a horizontal stroke: one y, drawn left to right, ends on its last point
        assert np.ptp(piece[:, 1]) < 1e-6 and np.all(np.diff(piece[:, 0]) > 0)
    assert len({round(float(p[0, 1]), 4) for p in pieces[:3]}) == 3


def test_arc_length_resampling_is_even():
    theta = np.linspace(0, np.pi / 2, 400)
    arc = np.stack([np.cos(theta), np.sin(theta)], 1)
    uneven = np.array([[0.0, 0.0], [0.01, 0.0], [1.0, 0.0], [1.0, 0.7]])
    for stroke, length in ((arc, np.pi / 2), (uneven, 1.7)):
        (out,) = resample_strokes([stroke], 0.05)
        gaps = np.hypot(*np.diff(out, axis=0).T)
        assert len(out) == int(np.ceil(length / 0.05)) + 1 and np.allclose(out[[0, -1]], stroke[[0, -1]])
        assert gaps.max() <= 0.05 + 1e-9 and gaps.max() / gaps.min() < 1.25
    (dot,) = resample_strokes([np.array([[2.0, 3.0], [2.0, 3.0]])], 0.05)
    assert dot.shape == (1, 2)


def test_long_samples_are_coarsened_not_truncated():
    zigzag = np.array([[i % 2, i] for i in range(40)], dtype=float)
    points = check_stroke_item(strokes_to_points([zigzag, zigzag + [5, 0]], max_len=24, spacing=0.01), 24, 2)
    assert len(points) >= 20  # the coarsest spacing that fits, not far below max_len
    for piece in split_at_pens(points):
        gaps = np.hypot(*np.diff(piece, axis=0).T)
        assert gaps.max() / gaps.min() < 1.3
        assert piece[-1, 1] > piece[0, 1] + 2  # the whole stroke is still there
    with pytest.raises(DatasetFormatError, match="record 7.*max_len=5"):
        strokes_to_points([zigzag] * 3, max_len=5, where="record 7")


# --------------------------------------------------------------------------- QuickDraw and VMNIST
def drawing(k):
    return [[[0, 50 + k, 100], [10, 10, 20]], [[20, 20], [0, 90 + k]]]


def write_ndjson(path, raw=False, bad_line=None, bad_text="{not json"):
    lines = []
    for k in range(22):
        strokes = [s + [list(range(len(s[0])))] for s in drawing(k)] if raw else drawing(k)
        lines.append(json.dumps({"word": "cat", "recognized": True, "drawing": strokes}))
    if bad_line is not None:
        lines[bad_line - 1] = bad_text
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("raw", [False, True])
def test_quickdraw_ndjson(tmp_path, raw):
    file = write_ndjson(tmp_path / "cat.ndjson", raw=raw)
    train, test = get_dataset(f"quickdraw:{file}", max_len=32), QuickDraw(file, "test", max_len=32)
    assert (len(train), len(test), train.num_classes, train.labels) == (20, 2, None, None)
    for ds in (train, test):
        for i in range(len(ds)):
            check_stroke_item(ds[i], 32, strokes=2)
    assert get_dataset(f"quickdraw:{file}", limit=3).name.endswith("-train-L64-first3")


@pytest.mark.parametrize("count", [0, 1])
def test_quickdraw_ndjson_too_small_for_a_test_split_says_so(tmp_path, count):
    file = tmp_path / "few.ndjson"
    file.write_text("\n" + "".join(json.dumps({"drawing": drawing(k)}) + "\n\n" for k in range(count)))
    for split in ("train", "test"):
        with pytest.raises(ValueError) as e:
            get_dataset(f"quickdraw:{file}", split=split)
        message = str(e.value)
        assert "\n" not in message and f"{file} holds {count} record" in message and "at least 2" in message
    with pytest.raises(ValueError, match=re.escape(str(file))):
        get_dataset(f"quickdraw:{tmp_path}")  # one class of a folder too small
    file.write_text("".join(json.dumps({"drawing": drawing(k)}) + "\n" for k in range(2)))
    assert (len(QuickDraw(str(file))), len(QuickDraw(str(file), "test"))) == (1, 1)


@pytest.mark.parametrize("bad_text", ["{not json", '{"word": "cat"}', '{"drawing": [[[1, 2], [3]]]}',
                                      '{"drawing": [[[1, "2"], [3, 4]]]}', '{"drawing": []}'])
def test_quickdraw_malformed_line_names_file_and_line(tmp_path, bad_text):
    file = write_ndjson(tmp_path / "cat.ndjson", bad_line=4, bad_text=bad_text)
    ds = QuickDraw(file)
    ds[1]
    with pytest.raises(DatasetFormatError, match=re.escape(file) + ": line 4"):
        ds[2]  # train items are records 1, 2, 3, ...: index 2 is record 3, line 4


def test_quickdraw_folder_is_classes(tmp_path):
    write_ndjson(tmp_path / "b_dog.ndjson")
    write_ndjson(tmp_path / "a_cat.ndjson", raw=True)
    ds = get_dataset(f"quickdraw:{tmp_path}")
    assert ds.num_classes == 2 and ds.classes == ["a_cat", "b_dog"] and len(ds) == 40
    assert ds.labels.tolist() == [0] * 20 + [1] * 20
    check_stroke_item(ds[25], 64, strokes=2)


def to_stroke3(strokes):
    rows, prev = [], np.zeros(2)
    for s in strokes:
        for k, p in enumerate(s):
            rows.append([*(p - prev), k == len(s) - 1])
            prev = p
    return np.array(rows, dtype=np.int16)


def object_array(items):
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


@pytest.fixture
def npz_file(tmp_path):
    def records(n, base):
        return object_array([to_stroke3([np.array(s, float).T for s in drawing(base + k)]) for k in range(n)])
    path = tmp_path / "sketch.npz"
    np.savez(path, train=records(5, 0), valid=records(2, 10), test=records(3, 20),
             train_labels=np.arange(5), test_labels=np.array([9, 0, 3]))
    return str(path)


def test_npz_stroke3(npz_file):
    arrays = np.load(npz_file, allow_pickle=True, encoding="latin1")
    strokes = stroke3_to_strokes(arrays["train"][1], "x")
    assert len(strokes) == 2 and np.array_equal(strokes[0], np.array(drawing(1)[0], float).T)
    assert np.array_equal(strokes[1], np.array(drawing(1)[1], float).T)
    lengths = {split: len(get_dataset(f"quickdraw:{npz_file}", split=split)) for split in ("train", "valid", "test")}
    assert lengths == {"train": 5, "valid": 2, "test": 3}
    check_stroke_item(QuickDraw(npz_file, "valid")[1], 64, strokes=2)
    digits = get_dataset(f"vmnist:{npz_file}", split="test", max_len=48)
    assert digits.num_classes == 10 and digits.labels.tolist() == [9, 0, 3] and digits.kind == "stroke"
    check_stroke_item(digits[2], 48, strokes=2)
    unlabelled = VMNIST(npz_file, "valid")
    assert unlabelled.num_classes is None and unlabelled.labels is None


def test_npz_malformed_record_names_file_and_record(tmp_path):
    path = str(tmp_path / "bad.npz")
    good = to_stroke3([np.array([[0, 0], [5, 5]], float)])
    np.savez(path, train=object_array([good, good, good[:, :2]]), test=object_array([good]),
             test_labels=np.array([12]))
    ds = QuickDraw(path)
    ds[1]
    with pytest.raises(DatasetFormatError, match=re.escape(path) + ".*'train' record 2"):
        ds[2]
    with pytest.raises(DatasetFormatError, match=re.escape(path) + ".*test_labels"):
        VMNIST(path, "test")
    with pytest.raises(DatasetFormatError, match="no array 'valid'"):
        QuickDraw(path, "valid")


def test_npz_empty_split_raises(tmp_path):
    path = str(tmp_path / "empty.npz")
    good = to_stroke3([np.array([[0, 0], [5, 5]], float)])
    np.savez(path, train=object_array([good, good]), test=object_array([]))
    assert len(QuickDraw(path)) == 2
    for make in (QuickDraw, VMNIST):
        with pytest.raises(ValueError) as e:
            make(path, "test")
        assert "\n" not in str(e.value) and path in str(e.value) and "'test'" in str(e.value)


class RunsShell:
    """Pickles as a call of os.system: unpickling it runs ``command``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_npz_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    path = str(tmp_path / "evil.npz")
    good = to_stroke3([np.array([[0, 0], [5, 5]], float)])
    evil = RunsShell(f"touch {shlex.quote(str(marker))}")
    np.savez(path, train=object_array([good, evil]), test=object_array([good]))
    for load in (lambda: QuickDraw(path), lambda: VMNIST(path), lambda: read_npz(path, ["train"])):
        with pytest.raises(ValueError) as e:
            load()
        message = str(e.value)
        assert "\n" not in message and path in message and "would run code" in message and "system" in message
        assert not marker.exists()
    assert len(QuickDraw(path, "test")) == 1  # the arrays that are plain still load
    np.load(path, allow_pickle=True)["train"]  # the payload is live: numpy's own loader runs it
    assert marker.exists()


class RawObjectArray:
    """Pickles as numpy.ndarray(shape, "O", buffer): an object array of made-up pointers."""

    def __reduce__(self):
        return np.ndarray, ((1,), "O", b"\x01" * 8)


def test_npz_that_would_call_ndarray_is_refused(tmp_path):
    path = str(tmp_path / "pointers.npz")
    np.savez(path, train=object_array([RawObjectArray()]))
    # in a child process: numpy's own loader crashes the interpreter on this file
    code = ("import sys; from sparse_diffusion.data.stroke_datasets import read_npz\n"
            "try:\n    read_npz(sys.argv[1], ['train'])\nexcept ValueError as e:\n    print('refused:', e)")
    done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(f"refused: {path}: array 'train'"), done


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str (BINSTRING), as in sketch-rnn's Python 2 era .npz files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_str8(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_str8


def test_npz_arrays_round_trip(npz_file, tmp_path):
    names, arrays = read_npz(npz_file, ["train", "test", "train_labels", "missing"])
    assert names == ["train", "valid", "test", "train_labels", "test_labels"]
    assert set(arrays) == {"train", "test", "train_labels"}
    with np.load(npz_file, allow_pickle=True, encoding="latin1") as z:
        for name, array in arrays.items():
            assert array.dtype == z[name].dtype and array.shape == z[name].shape
            assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(array.ravel(), z[name].ravel()))
        records = z["train"]
    # the same records as Python 2 wrote them: protocol 2, numpy.core names, bytes as str
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(records)
    old = buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in old and b"_codecs" not in old
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, np.lib.format.header_data_from_array_1_0(records))
    path = tmp_path / "python2.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("train.npy", npy.getvalue() + old)
    with np.load(path, allow_pickle=True, encoding="latin1") as z:
        expected = z["train"]
    (got,) = read_npz(str(path), ["train"])[1].values()
    assert got.dtype == expected.dtype == object and len(got) == len(expected) == len(records)
    assert all(a.dtype == b.dtype == np.int16 and np.array_equal(a, b) for a, b in zip(got, expected))
    assert all(np.array_equal(a, b) for a, b in zip(got, records))
    check_stroke_item(QuickDraw(str(path))[4], 64, strokes=2)


# --------------------------------------------------------------------------- KanjiVG
def test_real_kanjivg_parses():
    folder = kanjivg_dir()
    names = sorted(n for n in os.listdir(folder) if n.endswith(".svg"))
    assert len(names) == 11662
    picked = names[::583][:19] + ["06f22.svg"]
    for name in picked:
        text = open(os.path.join(folder, name), encoding="utf-8").read()
        ds = re.findall(r'<path [^>]*\bd="([^"]*)"', text)
        strokes = parse_svg_strokes(os.path.join(folder, name))
        assert len(strokes) == len(ds) > 0
        for d, stroke in zip(ds, strokes):
            x, y = map(float, re.match(r"\s*[Mm]\s*([-+.\d]+)[\s,]*([-+.\d]+)", d).groups())
            assert np.allclose(stroke[0], (x, y)) and len(stroke) > 1
            assert stroke.min() > -10 and stroke.max() < 120  # within the 109 x 109 box
    ds = KanjiVG("train", limit=20)
    assert ds.name == "kanjivg-train-L64-first20" and len(ds) == 20
    for i in range(20):
        check_stroke_item(ds[i], 64)
    assert get_dataset("kanjivg").name == "kanjivg-train-L64"
