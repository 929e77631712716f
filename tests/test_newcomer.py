"""What a newcomer hit (issue 17): folder labels by name, a model's input shape checked at load, no
torch.jit.load deprecation noise, numpy arrays to ``fit``, and reports that say the largest
certifiable radius instead of showing silent zero columns."""

from __future__ import annotations

import csv
import hashlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from blackbox_rs import stats
from blackbox_rs.connectors import CallableConnector, ConnectorInfo, TorchScriptConnector
from blackbox_rs.data_files import load_images
from blackbox_rs.errors import ConfigError, InvalidInputError, InvalidParameterError
from blackbox_rs.fitting.data import as_fit_data
from blackbox_rs.reports import accuracy_table, write_report

SHAPE = (3, 8, 8)
K = 5


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3 * 8 * 8, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))


class FixedBatch(nn.Module):  # traced with one image: the batch of 1 is baked into the graph
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 8 * 8, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.reshape(1, 3 * 8 * 8))


class FirstRow(Linear):  # answers every batch with one row
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))[:1]


@pytest.fixture(scope="module")
def linear_pt(tmp_path_factory):
    p = tmp_path_factory.mktemp("nc") / "linear.pt"
    torch.jit.save(torch.jit.script(Linear().eval()), str(p))
    return p


# ---------------------------------------------------------------------------------------------
# 1. image folders are labelled by folder name against the connector's class names
def _image_folder(root, names):
    from PIL import Image

    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((4, 4), 40 * i, dtype=np.uint8), mode="L").save(root / name / "a.png")
    return root


def test_folders_are_labelled_by_their_numeric_names(tmp_path):
    root = _image_folder(tmp_path / "data", ["0", "3", "4", "6"])
    x, y = load_images(root, (1, 4, 4), class_names=[str(i) for i in range(10)])
    assert y.tolist() == [0, 3, 4, 6]  # not 0, 1, 2, 3 by sorted position
    assert torch.allclose(x[:, 0, 0, 0], torch.tensor([0, 40, 80, 120]) / 255.0)


def test_folders_are_labelled_by_class_name_and_integer_index(tmp_path):
    root = _image_folder(tmp_path / "named", ["dog", "owl"])
    _, y = load_images(root, (1, 4, 4), class_names=["cat", "dog", "owl"])
    assert y.tolist() == [1, 2]
    root = _image_folder(tmp_path / "padded", ["02", "07"])  # an integer name is a class index
    _, y = load_images(root, (1, 4, 4), class_names=[str(i) for i in range(10)])
    assert y.tolist() == [2, 7]


def test_a_folder_that_names_no_class_is_a_typed_error(tmp_path):
    root = _image_folder(tmp_path / "data", ["cat", "zebra"])
    with pytest.raises(ConfigError, match=r"'zebra'.*'cat', 'dog', 'owl'"):
        load_images(root, (1, 4, 4), class_names=["cat", "dog", "owl"])
    root = _image_folder(tmp_path / "num", ["3", "12"])  # 12 is no index of 10 classes
    with pytest.raises(ConfigError, match=r"'12'"):
        load_images(root, (1, 4, 4), class_names=[str(i) for i in range(10)])


def test_without_class_names_folders_keep_their_sorted_position(tmp_path):
    root = _image_folder(tmp_path / "data", ["0", "3", "4", "6"])
    assert load_images(root, (1, 4, 4))[1].tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# 2. the model's real input shape is checked at load, in one line
@pytest.mark.parametrize("num_classes", [K, None])
def test_a_wrong_input_shape_fails_at_load_in_one_line(linear_pt, num_classes):
    with pytest.raises(InvalidParameterError) as ei:
        TorchScriptConnector(linear_pt, input_shape=(1, 8, 8), num_classes=num_classes)
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert "(1, 8, 8)" in msg and "mat1 and mat2 shapes cannot be multiplied" in msg
    assert "Traceback" not in msg and "code/__torch__" not in msg


def test_a_fixed_batch_dimension_fails_at_load(tmp_path):
    p = tmp_path / "fixed.pt"
    torch.jit.save(torch.jit.trace(FixedBatch().eval(), torch.zeros(1, *SHAPE)), str(p))
    with pytest.raises(InvalidParameterError, match="batch of 2") as ei:
        TorchScriptConnector(p, input_shape=SHAPE, num_classes=K)
    assert "\n" not in str(ei.value)
    conn = TorchScriptConnector(p, input_shape=SHAPE, num_classes=K, max_batch=1)  # one image at a time is fine
    assert len(conn.query(torch.zeros(1, *SHAPE))) == 1
    first = tmp_path / "first.pt"
    torch.jit.save(torch.jit.script(FirstRow().eval()), str(first))
    with pytest.raises(InvalidParameterError, match=r"batch of 2 images wrongly.*got \(1, 5\)"):
        TorchScriptConnector(first, input_shape=SHAPE)


def test_a_static_batch_exported_program_fails_at_load(tmp_path):
    p = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(Linear().eval(), (torch.zeros(2, *SHAPE),)), str(p))
    with pytest.raises(InvalidParameterError, match="dynamic batch"):
        TorchScriptConnector(p, input_shape=SHAPE, num_classes=K)


def test_output_width_is_checked_against_the_declared_classes(linear_pt):
    with pytest.raises(InvalidParameterError, match="returns 5 logits"):
        TorchScriptConnector(linear_pt, input_shape=SHAPE, class_names=["a", "b", "c"])
    with pytest.raises(InvalidParameterError, match="returns 5 logits.*num_classes=7"):
        TorchScriptConnector(linear_pt, input_shape=SHAPE, num_classes=7)
    conn = TorchScriptConnector(linear_pt, input_shape=SHAPE, class_names=list("abcde"))
    assert conn.info.fingerprint == "torchscript:sha256:" + hashlib.sha256(linear_pt.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# 3. no torch.jit.load deprecation warning from the SDK's own load, and no global filter
def test_loading_prints_no_jit_deprecation_warning(linear_pt):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        TorchScriptConnector(linear_pt, input_shape=SHAPE)
        assert not [w for w in seen if "torch.jit.load" in str(w.message)], [str(w.message) for w in seen]
        assert warnings.filters == filters  # no filter left behind
        torch.jit.load(str(linear_pt))  # outside the SDK's own call the warning is left alone
    if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 9):
        assert [w for w in seen if "torch.jit.load" in str(w.message)]


# ---------------------------------------------------------------------------------------------
# 4. numpy arrays to fit
INFO = ConnectorInfo(input_shape=(3, 4, 4), class_names=("a", "b", "c"), fingerprint="test:info")


def test_numpy_arrays_are_fit_data():
    rng = np.random.default_rng(0)
    x = rng.random((6, 3, 4, 4))  # float64 in [0, 1]
    y = np.array([0, 1, 2, 0, 1, 2], dtype=np.int32)
    data = as_fit_data((x, y), INFO)
    assert data.x.dtype == torch.float32 and torch.allclose(data.x, torch.from_numpy(x).float())
    assert data.y.dtype == torch.int64 and data.y.tolist() == y.tolist()
    u8 = (x * 255).round().astype(np.uint8)
    data = as_fit_data((u8, y), INFO)
    assert torch.allclose(data.x, torch.from_numpy(u8).float() / 255.0)
    nhwc = as_fit_data((u8.transpose(0, 2, 3, 1), y), INFO)  # channels last
    assert torch.equal(nhwc.x, data.x)
    assert as_fit_data(u8, INFO).y is None
    items = as_fit_data([(u8[i], int(y[i])) for i in range(6)], INFO)  # a dataset of numpy items
    assert torch.equal(items.x, data.x) and items.y.tolist() == y.tolist()


@pytest.mark.parametrize("case", ["dtype", "shape", "range", "nan", "float_labels", "label_length"])
def test_bad_numpy_fit_data_is_a_typed_error_naming_the_problem(case):
    x = np.random.default_rng(1).random((4, 3, 4, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 0])
    bad, match = {
        "dtype": (((x * 255).astype(np.int32), y), "numpy dtype int32"),
        "shape": ((x[:, :, :3], y), r"N x 3 x 4 x 4"),
        "range": ((x * 2, y), r"\[0, 1\]"),
        "nan": ((np.where(x > 0.5, np.nan, x), y), "NaN"),
        "float_labels": ((x, y.astype(np.float64)), "labels must be integers"),
        "label_length": ((x, y[:3]), "labels must be 4 integers"),
    }[case]
    with pytest.raises(InvalidInputError, match=match):
        as_fit_data(bad, INFO)


# ---------------------------------------------------------------------------------------------
# 5. reports say the largest certifiable radius and mark columns above it
def _constant(shape=(1, 4, 4)):
    return CallableConnector(lambda b: torch.zeros(len(b), dtype=torch.int64), input_shape=shape, num_classes=2)


def test_cohen_report_marks_radii_beyond_the_largest_certifiable(tmp_path):
    from blackbox_rs.dataset import certify_dataset

    x = torch.full((3, 1, 4, 4), 0.5)
    radii = [0.0, 0.25, 0.5, 1.0]
    res = certify_dataset(_constant(), x, [0, 0, 0], sigma=0.25, n0=10, n=100, alpha=0.001, seed=1, radii=radii)
    reach = stats.max_radius(100, 0.25, 0.001)
    assert 0.25 < reach < 0.5
    table = accuracy_table({"cohen": res})
    assert table.splitlines()[2] == "| cohen | 1.000 | 1.000 | — | — |"
    assert "not certifiable with these settings" in table and f"cohen: {reach:.4g}" in table
    files = write_report({"cohen": res}, tmp_path / "rep")
    summary = open(files.summary).read()
    assert f"largest certifiable radius with these settings: {reach:.4g}" in summary
    assert "| cohen | 1.000 | 1.000 | — | — |" in summary
    with open(files.accuracy_csv) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["run", "0", "0.25", "0.5", "1", "max_certifiable_radius"]
    assert rows[1][:5] == ["cohen", "1.0000", "1.0000", "", ""]
    assert float(rows[1][5]) == pytest.approx(reach, rel=1e-5)
    from blackbox_rs.reports import max_certifiable_radius

    assert max_certifiable_radius(res) == pytest.approx(reach)


def test_report_without_unreachable_radii_has_no_marks():
    from blackbox_rs.dataset import certify_dataset

    res = certify_dataset(_constant(), torch.full((2, 1, 4, 4), 0.5), [0, 1], sigma=0.25, n0=10, n=100,
                          alpha=0.001, seed=1, radii=[0.0, 0.25])
    table = accuracy_table({"run": res})
    assert "—" not in table and "not certifiable" not in table
    assert "| run | 0.500 | 0.500 |" in table


def test_sequential_report_states_the_largest_reachable_target(tmp_path):
    from blackbox_rs.certify_sequential import certify_radius_dataset

    res = certify_radius_dataset(_constant(), torch.full((2, 1, 4, 4), 0.5), [0, 0], radius=[0.25], sigma=0.25,
                                 alpha=0.001, n0=10, max_queries=400, seed=2)
    table = accuracy_table({"seq": res}, [0.25, 0.5])
    assert "| seq | 1.000 | — |" in table
    files = write_report({"seq": res}, tmp_path / "rep")
    summary = open(files.summary).read()
    assert "largest certifiable radius with these settings: 0.25" in summary and "max_queries = 400" in summary
    from blackbox_rs.reports import max_certifiable_radius

    assert max_certifiable_radius(res) == 0.25
