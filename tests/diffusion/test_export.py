"""Models leave the project cleanly: densify, the save_pretrained refusal, the sparse form on
disk (sd.save_pretrained / sd.load_pretrained) and export_run."""
import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import sparse_diffusion as sd
import sparse_kernels as sk
from sparse_diffusion.channels_last import channels_last
from sparse_diffusion.models.unet import build_unet

X = dict(sample=torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)),
         timestep=torch.tensor([10, 500]), class_labels=torch.tensor([1, 3]))


def sparse_unet(memory_format="contiguous"):
    """A tiny class-conditional UNet2DModel with 13 block-sparse layers, one of them masked-dense
    and one whose storage slots are not in (row, col) order (as after a RigL update)."""
    torch.manual_seed(0)
    unet = build_unet("tiny", 16, 1, 10)
    sd.sparsify(unet, 0.5, block_size=16)
    layers = [m for m in unet.modules() if isinstance(m, sk.BlockSparseModule)]
    layers[0].masked_dense = True
    shuffled = max(layers, key=lambda m: m.nnz)
    order = torch.randperm(shuffled.nnz)
    with torch.no_grad():
        for tensor in (shuffled.values, shuffled.row_idx, shuffled.col_idx):
            tensor.copy_(tensor[order].clone())
    shuffled.rebuild_index()
    if memory_format == "channels_last":
        channels_last(unet)
    return unet.eval()


def forward(model):
    with torch.no_grad():
        return model(**X).sample


# --------------------------------------------------------------------------- densify
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(32, 32, 3, padding=2, dilation=2, bias=False)
        self.head = nn.Linear(32 * 4 * 4, 48)

    def forward(self, x):
        return self.head(self.dilated(self.conv(x)).flatten(1))


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_densify_gives_the_exact_dense_weights(memory_format):
    model = Net()
    sd.sparsify(model, 0.5, block_size=16, keep_dense=[], distribution="uniform")
    model.dilated.masked_dense = True
    model.head.eval()  # a training flag that differs from its parent's
    model.conv.bias.requires_grad_(False)
    if memory_format == "channels_last":
        model.to(memory_format=torch.channels_last)
    sparse = {name: m for name, m in model.named_modules() if isinstance(m, sk.BlockSparseModule)}
    assert set(sparse) == {"conv", "dilated", "head"}
    expected = {name: (m.to_dense().detach().clone(), m.layout.block_mask(), m.training) for name, m in sparse.items()}
    x = torch.randn(3, 16, 8, 8)
    before = model(x).detach()

    assert sd.densify(model) is model
    assert not any(isinstance(m, sk.BlockSparseModule) for m in model.modules())
    assert (type(model.conv), type(model.dilated), type(model.head)) == (nn.Conv2d, nn.Conv2d, nn.Linear)
    for name, (weight, block_mask, training) in expected.items():
        dense = model.get_submodule(name)
        assert torch.equal(dense.weight, weight) and dense.weight.dtype == torch.float32
        dead = ~block_mask.repeat_interleave(16, 0).repeat_interleave(16, 1)
        assert (dense.weight[dead] == 0).all() and (dense.weight[~dead] != 0).all()
        assert dense.training == training
    assert model.head.training is False and model.conv.bias.requires_grad is False
    assert (model.conv.stride, model.conv.padding, model.dilated.dilation, model.dilated.padding) == (
        (2, 2), (1, 1), (2, 2), (2, 2))
    assert model.dilated.bias is None and model.conv.bias is not None
    layout = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    assert all(conv.weight.is_contiguous(memory_format=layout) for conv in (model.conv, model.dilated))
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_densify_keeps_dtype_and_a_unet_stays_channels_last():
    model = nn.Sequential(sk.BlockSparseLinear(32, 48, block_size=16, density=0.5, dtype=torch.bfloat16))
    weight = model[0].to_dense().detach().clone()
    sd.densify(model)
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.bfloat16
    assert torch.equal(model[0].weight, weight)

    unet = sparse_unet("channels_last")
    before = forward(unet)
    sd.densify(unet)
    convs = [m for m in unet.modules() if type(m) is nn.Conv2d and m.kernel_size == (3, 3)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not any(isinstance(m, sk.BlockSparseModule) for m in unet.modules())
    torch.testing.assert_close(forward(unet), before, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the diffusers refusal
def test_diffusers_save_pretrained_refuses_a_sparse_model_until_densify(tmp_path):
    from diffusers import UNet2DModel

    unet = sparse_unet()
    for model in (unet, copy.deepcopy(unet), pickle.loads(pickle.dumps(unet))):
        with pytest.raises(ValueError) as refusal:
            model.save_pretrained(tmp_path / "refused")
        message = str(refusal.value)
        assert "\n" not in message
        assert "sparse_diffusion.save_pretrained(model, directory)" in message
        assert "sparse_diffusion.densify(model) then model.save_pretrained(directory)" in message
    assert not (tmp_path / "refused").exists()
    # The class and other models are untouched; plain modules get no attribute.
    assert type(unet).save_pretrained is UNet2DModel.save_pretrained
    build_unet("tiny", 16, 1, 10).save_pretrained(tmp_path / "plain")
    net = Net()
    sd.sparsify(net, 0.5, block_size=16, keep_dense=[])
    assert "save_pretrained" not in vars(net)

    sparse_output = forward(unet)
    sd.densify(unet)
    assert "save_pretrained" not in vars(unet)
    unet.save_pretrained(tmp_path / "dense")
    loaded = UNet2DModel.from_pretrained(tmp_path / "dense")
    assert torch.equal(forward(loaded), forward(unet))
    torch.testing.assert_close(forward(loaded), sparse_output, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the sparse form
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_sparse_save_and_load_round_trip_exactly(tmp_path, memory_format):
    from diffusers import UNet2DModel

    unet = sparse_unet(memory_format)
    assert sd.save_pretrained(unet, tmp_path / "unet") == tmp_path / "unet"
    assert sorted(os.listdir(tmp_path / "unet")) == [
        "block_sparse_layers.json", "block_sparse_model.safetensors", "config.json"]
    described = json.loads((tmp_path / "unet" / "block_sparse_layers.json").read_text())
    assert described["memory_format"] == memory_format
    assert described["layers"][0] == {
        "name": "down_blocks.1.resnets.0.conv1", "kind": "BlockSparseConv2d", "block_size": [16, 16],
        "masked_dense": True, "live_blocks": 1}

    loaded = sd.load_pretrained(tmp_path, subfolder="unet")
    assert type(loaded) is UNet2DModel and not loaded.training
    modules = dict(loaded.named_modules())
    for name, module in unet.named_modules():
        assert type(modules[name]) is type(module), name
        if isinstance(module, sk.BlockSparseModule):
            assert torch.equal(modules[name].row_idx, module.row_idx)
            assert torch.equal(modules[name].col_idx, module.col_idx)
            assert torch.equal(modules[name].layout.block_mask(), module.layout.block_mask())
            assert modules[name].masked_dense == module.masked_dense
    saved = unet.state_dict()
    assert all(torch.equal(tensor, saved[key]) for key, tensor in loaded.state_dict().items())
    assert torch.equal(forward(loaded), forward(unet))
    with pytest.raises(ValueError, match="sparse_diffusion.save_pretrained"):
        loaded.save_pretrained(tmp_path / "refused")

    # Plain diffusers does not find weights it knows: an error, never a NaN model.
    with pytest.raises(OSError, match="no file named"):
        UNet2DModel.from_pretrained(tmp_path / "unet")
    # A folder holding diffusers weights is refused: from_pretrained would load those instead.
    sd.densify(unet).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="already holds diffusers weights"):
        sd.save_pretrained(unet, tmp_path / "dense")


class PlantsAMarker:
    """Unpickling it creates a file: what a pickle-reading loader would execute."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("name", ["config.json", "block_sparse_layers.json", "block_sparse_model.safetensors"])
def test_load_pretrained_reads_no_pickle_and_names_the_bad_file(tmp_path, name):
    sd.save_pretrained(sparse_unet(), tmp_path / "unet")
    marker = tmp_path / "executed"
    payload = pickle.dumps(PlantsAMarker(marker))
    pickle.loads(payload).close()  # the payload does execute when unpickled
    assert marker.exists()
    marker.unlink()
    (tmp_path / "unet" / name).write_bytes(payload)
    with pytest.raises(ValueError) as error:
        sd.load_pretrained(tmp_path / "unet")
    assert not marker.exists()
    message = str(error.value)
    assert str(tmp_path / "unet" / name) in message and "\n" not in message


def test_load_pretrained_refuses_a_class_outside_diffusers_models(tmp_path):
    sd.save_pretrained(sparse_unet(), tmp_path / "unet")
    path = tmp_path / "unet" / "config.json"
    for name in ("os.system", "Tensor", "DDPMScheduler", "DiffusionPipeline"):
        config = json.loads(path.read_text())
        config["_class_name"] = name
        path.write_text(json.dumps(config))
        with pytest.raises(ValueError, match="is not a diffusers model class"):
            sd.load_pretrained(tmp_path / "unet")


# --------------------------------------------------------------------------- export_run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Fashion-MNIST pixel run, static at sparsity 0.5, trained two steps (a LoadedRun)."""
    from sparse_diffusion.run import LoadedRun
    from sparse_diffusion.train import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("runs") / "run"
    config = TrainConfig(out=str(out), model="pixel", preset="tiny", dataset="fashion-mnist", image_size=16,
                         method="static", sparsity=0.5, block_size=16, steps=2, batch_size=4, limit=64,
                         sample_steps=2, checkpoint_every=0)
    trainer = Trainer(config)
    for _ in range(2):
        trainer.train_step()
    (out / "metrics.json").write_text(json.dumps({"final_loss": 0.75, "metrics": {"fid": 123.4}}))
    return LoadedRun(trainer.run, trainer.state)


def ema_dense_state(state):
    """sd.densify of the run's EMA model, as sampling.generate applies the EMA."""
    parameters = list(state.denoiser.parameters())
    state.ema.store(parameters)
    state.ema.copy_to(parameters)
    try:
        return sd.densify(copy.deepcopy(state.denoiser)).state_dict()
    finally:
        state.ema.restore(parameters)


PLAIN_DIFFUSERS = textwrap.dedent("""
    import json, sys
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    out = sys.argv[1]
    unet = UNet2DModel.from_pretrained(out, subfolder="unet").eval()
    finite = []
    for cls in (DDIMScheduler, DDPMScheduler):
        scheduler = cls.from_pretrained(out, subfolder="scheduler")
        scheduler.set_timesteps(3)
        x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        labels = torch.arange(2) % unet.config.num_class_embeds
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t.expand(2), class_labels=labels).sample, t, x).prev_sample
        finite.append(bool(torch.isfinite(x).all()))
    modules = [name for name in ("sparse_diffusion", "sparse_kernels") if name in sys.modules]
    print(json.dumps({"finite": finite, "modules": modules}))
""")


def test_export_run_writes_a_plain_diffusers_folder(trained, tmp_path):
    from safetensors.torch import load_file

    before = {key: tensor.clone() for key, tensor in trained.state.denoiser.state_dict().items()}
    out = sd.export_run(trained, tmp_path / "export")
    assert out == tmp_path / "export"
    assert sorted(os.listdir(out)) == ["README.md", "scheduler", "unet"]
    assert os.listdir(tmp_path) == ["export"]  # no staging folder left beside it

    # The run's model is untouched: same weights, still sparse, still refusing.
    assert all(torch.equal(tensor, before[key]) for key, tensor in trained.state.denoiser.state_dict().items())
    assert any(isinstance(m, sk.BlockSparseModule) for m in trained.state.denoiser.modules())
    with pytest.raises(ValueError):
        trained.state.denoiser.save_pretrained(tmp_path / "refused")

    result = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(out)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"finite": [True, True], "modules": []}

    exported = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    expected = ema_dense_state(trained.state)
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[key], expected[key].cpu()) for key in expected)
    raw = sd.densify(copy.deepcopy(trained.state.denoiser)).state_dict()
    assert any(not torch.equal(raw[key], expected[key]) for key in expected)  # the EMA weights, not the raw ones

    card = (out / "README.md").read_text()
    for text in ("library_name: diffusers", "Static-DM", "| sparsity | 0.5", "| block size | 16x16 |",
                 "| steps | 2 |", "| dataset | fashion-mnist |", "| prediction type | epsilon |",
                 "| final_loss | 0.75 |", "| fid | 123.4 |", 'UNet2DModel.from_pretrained("export", subfolder="unet")'):
        assert text in card, text


def test_export_run_sparse_form_and_refusals(trained, tmp_path, monkeypatch):
    out = sd.export_run(trained, tmp_path / "sparse", sparse=True)
    assert sorted(os.listdir(out / "unet")) == [
        "block_sparse_layers.json", "block_sparse_model.safetensors", "config.json"]
    loaded = sd.load_pretrained(out, subfolder="unet")
    parameters = list(trained.state.denoiser.parameters())
    trained.state.ema.store(parameters)
    trained.state.ema.copy_to(parameters)
    try:
        expected = {key: tensor.clone() for key, tensor in trained.state.denoiser.state_dict().items()}
    finally:
        trained.state.ema.restore(parameters)
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in loaded.state_dict().items())
    assert "sd.load_pretrained" in (out / "README.md").read_text()

    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        sd.export_run(trained, out)
    chirodiff = SimpleNamespace(run=SimpleNamespace(config=SimpleNamespace(model="chirodiff")),
                                state=SimpleNamespace(denoiser=nn.GRU(3, 8)))
    with pytest.raises(ValueError, match="export supports pixel and ldm runs"):
        sd.export_run(chirodiff, tmp_path / "chirodiff")
    assert not (tmp_path / "chirodiff").exists()

    # A failure half-way leaves neither the folder nor its staging copy.
    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(trained.state.task.scheduler, "save_pretrained", disk_full)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="disk full"):
        sd.export_run(trained, tmp_path / "empty")
    with pytest.raises(OSError, match="disk full"):
        sd.export_run(trained, tmp_path / "failed")
    assert sorted(os.listdir(tmp_path)) == ["empty", "sparse"]
    assert not os.listdir(tmp_path / "empty")


def test_export_run_of_a_latent_run_adds_the_vae(tmp_path):
    """A latent run (its pieces built directly: training an autoencoder first would be slow)."""
    from diffusers import AutoencoderKL, UNet2DModel
    from diffusers.training_utils import EMAModel

    from sparse_diffusion.diffusion import ImageDiffusion, make_scheduler
    from sparse_diffusion.models.autoencoder import build_autoencoder
    from sparse_diffusion.run import LoadedRun, Run
    from sparse_diffusion.train import TrainConfig

    autoencoder = build_autoencoder("tiny", 32, 1)
    unet = build_unet("tiny", 16, autoencoder.config.latent_channels, None)
    report = sd.sparsify(unet, 0.5, block_size=16)
    config = TrainConfig(out=str(tmp_path / "run"), model="ldm", autoencoder="ae", method="rigl", sparsity=0.5,
                         block_size=16, prediction="v")
    task = ImageDiffusion(unet, make_scheduler(prediction="v"), autoencoder, 0.5)
    ema = EMAModel(unet.parameters(), decay=0.9)
    with torch.no_grad():
        for shadow in ema.shadow_params:
            shadow.add_(0.25)
    state = SimpleNamespace(config=config, denoiser=unet, task=task, ema=ema, report=report, step=7)
    out = sd.export_run(LoadedRun(Run(config), state), tmp_path / "ldm")
    assert sorted(os.listdir(out)) == ["README.md", "scheduler", "unet", "vae"]
    vae = AutoencoderKL.from_pretrained(out, subfolder="vae")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), autoencoder.state_dict().values()))
    exported = UNet2DModel.from_pretrained(out, subfolder="unet").state_dict()
    expected = copy.deepcopy(unet)
    ema.copy_to(expected.parameters())
    expected = sd.densify(expected).state_dict()
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    assert any(isinstance(m, sk.BlockSparseModule) for m in unet.modules())  # the run's model is untouched
    card = (out / "README.md").read_text()
    assert "| prediction type | v_prediction |" in card and "| steps | 7 |" in card and "## Metrics" not in card
    assert 'AutoencoderKL.from_pretrained("ldm", subfolder="vae")' in card


def test_load_pretrained_names_the_file_of_an_inconsistent_folder(tmp_path):
    sd.save_pretrained(sparse_unet(), tmp_path / "unet")
    layers_path = tmp_path / "unet" / "block_sparse_layers.json"
    good = layers_path.read_text()
    for change, file_name in (({"block_size": [16, 7]}, layers_path.name), ({"live_blocks": 5}, layers_path.name),
                              ({"name": "conv_in"}, "block_sparse_model.safetensors"),
                              ({"kind": "BlockSparseLinear"}, layers_path.name)):
        described = json.loads(good)
        described["layers"][0].update(change)
        layers_path.write_text(json.dumps(described))
        with pytest.raises(ValueError) as error:
            sd.load_pretrained(tmp_path / "unet")
        assert file_name in str(error.value) and "\n" not in str(error.value), change


def test_vector_blocks_save_load_and_densify_exactly(tmp_path):
    """A UNet with (16, 1) blocks: the sparse form round-trips (masks and outputs), densify is exact."""
    torch.manual_seed(0)
    unet = build_unet("tiny", 16, 1, 10)
    report = sd.sparsify(unet, 0.75, block_size=(16, 1))
    assert report.block_size == (16, 1) and report.sparse_layers
    with torch.no_grad():
        expected = unet(**X).sample
    sd.save_pretrained(unet, tmp_path / "unet")
    described = json.loads((tmp_path / "unet" / "block_sparse_layers.json").read_text())
    assert {tuple(layer["block_size"]) for layer in described["layers"]} == {(16, 1)}
    loaded = sd.load_pretrained(tmp_path / "unet")
    with torch.no_grad():
        assert torch.equal(loaded(**X).sample, expected)
    sd.densify(unet)
    assert not any(isinstance(m, sk.BlockSparseModule) for m in unet.modules())
    with torch.no_grad():
        torch.testing.assert_close(unet(**X).sample, expected, rtol=1e-5, atol=1e-5)
