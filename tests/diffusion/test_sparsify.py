"""sparse_diffusion.sparsify and the layer-wise densities."""
import math

import pytest
import torch
from torch import nn

import sparse_diffusion as sd
import sparse_kernels as sk


class Net(nn.Module):
    """Convs and linears of assorted shapes, a grouped conv and an odd-channel conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False),
            nn.Conv2d(64, 64, 3, padding=1, groups=4), nn.Conv2d(64, 48, 1), nn.Conv2d(48, 40, 1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(40 * 4 * 4, 128), nn.SiLU(), nn.Linear(128, 64), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


class ReadsWeight(nn.Linear):
    """A subclass that reads .weight: sparsify must leave it alone."""

    def forward(self, x):
        return x @ self.weight.T


# --------------------------------------------------------------------------- densities
@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_densities_meet_the_global_sparsity_exactly(distribution, sparsity):
    shapes = [(32, 3, 3, 3), (64, 32, 3, 3), (64, 64, 3, 3), (128, 640), (10, 128), (512, 512, 3, 3)]
    densities = sd.layer_densities(shapes, sparsity, distribution)
    sizes = [math.prod(s) for s in shapes]
    assert all(0.0 <= d <= 1.0 for d in densities)
    assert sum(d * n for d, n in zip(densities, sizes)) == pytest.approx((1 - sparsity) * sum(sizes), rel=1e-9)


def test_erk_follows_rigl_and_caps_at_one():
    shapes = [(8, 3, 3, 3), (512, 512, 3, 3), (512, 512)]
    densities = sd.layer_densities(shapes, 0.9, "erk")
    assert densities[0] == 1.0  # the small layer would exceed 1: dense, its excess spread
    assert densities[2] < 1.0
    raw = [sum(s) / math.prod(s) for s in shapes[1:]]
    assert densities[1] / densities[2] == pytest.approx(raw[0] / raw[1])
    er = sd.layer_densities(shapes[1:], 0.9, "er")  # ER ignores the kernel: (out + in) / (out * in)
    assert er[0] == pytest.approx(er[1])
    with pytest.raises(ValueError, match="distribution"):
        sd.layer_densities(shapes, 0.5, "snip")


# --------------------------------------------------------------------------- surgery
def test_sparsify_replaces_what_the_kernels_take_and_reports_why_not():
    torch.manual_seed(0)
    model = Net()
    model.extra = ReadsWeight(16, 16)
    report = sd.sparsify(model, sparsity=0.75, block_size=16)
    by_name = {layer.name: layer for layer in report.layers}
    assert type(model.stem) is nn.Conv2d and by_name["stem"].path == "dense: kept (keep_dense)"
    assert type(model.head[4]) is nn.Linear and by_name["head.4"].path == "dense: kept (keep_dense)"
    assert "extra" not in by_name and type(model.extra) is ReadsWeight
    assert isinstance(model.body[0], sk.BlockSparseConv2d) and isinstance(model.head[1], sk.BlockSparseLinear)
    assert by_name["body.3"].path == "dense: groups=4"
    assert by_name["body.5"].path.startswith("dense: 40x48 channels")
    conv = model.body[2]
    assert (conv.stride, conv.padding, conv.bias) == ((2, 2), (1, 1), None)
    assert all(layer.path == "compiled" for layer in report.sparse_layers)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    # Exact up to one block per layer.
    one_block_each = sum(layer.params_dense / layer.total_blocks for layer in report.sparse_layers)
    total = sum(layer.params_dense for layer in report.budgeted_layers)
    assert abs(report.global_sparsity - 0.75) <= one_block_each / total
    lines = str(report).splitlines()
    assert lines[0].split()[:3] == ["layer", "type", "weight"] and len(lines) == len(report.layers) + 2
    assert f"sparsity {report.global_sparsity:.4f} over them (asked 0.75)" in lines[-1]


def test_keep_dense_globs_and_none():
    model = Net()
    report = sd.sparsify(model, 0.5, block_size=16, keep_dense=["head.*"])
    paths = {layer.name: layer.path for layer in report.layers}
    assert paths["stem"] == "dense: 32x3 channels not divisible by block 16x16"
    assert all(paths[name] == "dense: kept (keep_dense)" for name in ("head.1", "head.3", "head.4"))
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    sd.sparsify(model, 0.5, block_size=16, keep_dense=[])
    assert all(isinstance(m, sk.BlockSparseLinear) for m in model)


def test_sparsity_zero_keeps_the_function_and_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 64), nn.Conv2d(64, 64, 1)).to(torch.float64)
    x = torch.randn(3, 32, dtype=torch.float64)

    def run(m):
        h = m[1](m[0](x))
        return m[2](h[:, :, None, None])

    expected = run(model)
    report = sd.sparsify(model, 0.0, block_size=16, keep_dense=[])
    assert all(layer.path == "dense (density 1.0)" and layer.budgeted for layer in report.layers)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear, nn.Conv2d] and report.global_sparsity == 0.0
    torch.testing.assert_close(run(model), expected)
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 64)).to(torch.float64)
    sd.sparsify(model, 0.4, block_size=16, keep_dense=[], distribution="uniform")
    assert model[1].values.dtype == torch.float64


def test_layers_at_density_one_stay_dense_and_count_in_the_budget():
    """ERK gives small layers density 1.0: they run as plain layers, and the global sparsity
    is still exact over all the budgeted layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 512), nn.Linear(512, 512), nn.Linear(512, 16))
    report = sd.sparsify(model, 0.5, block_size=16, keep_dense=[], distribution="erk")
    dense = [layer for layer in report.layers if layer.path == "dense (density 1.0)"]
    assert dense and all(type(model[int(layer.name)]) is nn.Linear for layer in dense)
    assert all(layer.budgeted for layer in report.layers)
    assert abs(report.global_sparsity - 0.5) < 0.01
    assert "at density 1.0" in str(report).splitlines()[-1]


def test_layers_close_to_dense_run_dense_kernels_on_their_masked_weight():
    """From MASKED_DENSE_FROM (stride 1) or MASKED_DENSE_FROM_STRIDED up, a sparse layer runs
    dense kernels on its masked weight (the measured faster path), and says so."""
    import importlib

    module = importlib.import_module("sparse_diffusion.sparsify")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, stride=2, padding=1),
                          nn.Conv2d(64, 64, 3, padding=1))
    report = sd.sparsify(model, 0.25, block_size=16, keep_dense=[], distribution="uniform")
    density = 0.75  # 0.25 sparsity, uniform: below the stride-1 threshold, at the strided one
    assert module.MASKED_DENSE_FROM_STRIDED <= density < module.MASKED_DENSE_FROM
    assert [layer.path for layer in report.layers] == ["compiled", "masked dense (density >= 0.75)", "compiled"]
    assert [m.masked_dense for m in model] == [False, True, False]
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, stride=2, padding=1))
    report = sd.sparsify(model, 0.4, block_size=16, keep_dense=[], distribution="uniform", masked_dense=False)
    assert [layer.path for layer in report.layers] == ["compiled", "compiled"]
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    report = sd.sparsify(model, 0.1, block_size=16, keep_dense=[], distribution="uniform")
    assert all(layer.path == "masked dense (density >= 0.8)" and layer.budgeted for layer in report.layers)
    # Vector blocks cross over lower (MASKED_DENSE_FROM_VECTOR): at density 0.7 a 16x1 layer runs masked
    # dense, where a 16x16 one would not; at 0.5 it stays compiled.
    assert module.MASKED_DENSE_FROM_VECTOR <= 0.7 < module.MASKED_DENSE_FROM
    for sparsity, path in ((0.3, "masked dense (density >= 0.6)"), (0.5, "compiled")):
        model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Linear(64, 64))
        report = sd.sparsify(model, sparsity, block_size=(16, 1), keep_dense=[], distribution="uniform")
        assert [layer.path for layer in report.layers] == [path, path]


def test_init_magnitude_and_random_keep_the_dense_values():
    torch.manual_seed(0)
    dense = nn.Linear(64, 64)
    with torch.no_grad():
        dense.weight[:16, :16] *= 100
    model = nn.Sequential(dense)
    weight = dense.weight.detach().clone()
    sd.sparsify(model, 0.9, block_size=16, keep_dense=[], distribution="uniform", init="magnitude")
    assert model[0].nnz == 2 and model[0].layout.block_mask()[0, 0]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 64))
    weight = model[0].weight.detach().clone()
    sd.sparsify(model, 0.5, block_size=16, keep_dense=[], distribution="uniform", init="random")
    torch.testing.assert_close(model[0].values, sk.from_dense(weight, model[0].layout))


def test_block_size_one_is_unstructured_on_the_masked_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 20), nn.Linear(20, 12))
    report = sd.sparsify(model, 0.5, block_size=1, keep_dense=[], distribution="uniform")
    assert all(layer.path == "reference (masked, block 1)" for layer in report.layers)
    x = torch.randn(3, 24)
    expected = x @ model[0].to_dense().T + model[0].bias
    torch.testing.assert_close(model[0](x), expected)
    assert model[0].nnz == 240


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": 0.5, "distribution": "snip"}, "distribution"),
        ({"sparsity": 0.5, "init": "lottery"}, "init"),
        ({"sparsity": 0.5, "block_size": 48}, r"no layer can be sparsified with block size \(48, 48\)"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sd.sparsify(Net(), **kwargs)
