"""ChiroDiff noise predictors: shapes, padding invariance, the BiGRU against nn.GRU, sparsify."""
import pytest
import torch
from torch import nn

import sparse_diffusion as sd
import sparse_kernels as sk
from sparse_diffusion.models.chirodiff import BiGRU, ChiroDiffNet, FourierTimeEmbedding

KINDS = ["gru", "transformer"]


def small_net(kind: str, **kwargs) -> ChiroDiffNet:
    defaults = dict(hidden_size=32, num_layers=2) if kind == "gru" else dict(hidden_size=32, num_layers=2, num_heads=4)
    return ChiroDiffNet(kind, **{**defaults, **kwargs}).eval()


def batch(lengths=(5, 9), length=12):
    """Points ``[B, L, 3]`` with pen in {-1, 1}, timesteps ``[B]`` and lengths ``[B]``."""
    points = torch.randn(len(lengths), length, 3)
    points[..., 2] = torch.where(torch.rand(len(lengths), length) < 0.2, 1.0, -1.0)
    return points, torch.tensor([10, 700]), torch.tensor(lengths)


def linear_names(model: nn.Module):
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("kind", KINDS)
def test_output_shape_and_float_timesteps(kind):
    net = small_net(kind)
    x, t, lengths = batch()
    out = net(x, t, lengths)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(net(x, t.float(), lengths), out)  # int and float timesteps agree


def test_default_gru_is_the_papers_model():
    net = ChiroDiffNet()
    gru = net.backbone
    assert isinstance(gru, BiGRU) and gru.hidden_size == 96 and gru.num_layers == 3
    assert all(hasattr(layer, "fwd") and hasattr(layer, "bwd") for layer in gru.layers)
    assert net.time_embedding.freqs.numel() * 2 == 8
    # 2 per direction per layer, plus time MLP (2), input projection and head.
    names = linear_names(net)
    assert len(linear_names(gru)) == 2 * 2 * 3
    assert len(names) == 2 * 2 * 3 + 2 + 1 + 1
    assert net.input_proj.in_features == 5 + 8 and net.head.in_features == 2 * 96 and net.head.out_features == 3
    assert gru.layers[1].fwd.input_proj.in_features == 2 * 96
    x, t, lengths = batch(length=16)
    assert net(x, t, lengths).shape == (2, 16, 3)


def test_transformer_has_no_unsparsifiable_modules():
    net = ChiroDiffNet("transformer", hidden_size=64, num_layers=2, num_heads=4)
    kinds = {type(m) for m in net.modules()}
    assert not kinds & {nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.GRU}
    assert len(linear_names(net.backbone)) == 2 * 6  # q, k, v, out, 2 MLP per block
    assert all(len(list(m.parameters(recurse=False))) == 0 or type(m) in (nn.Linear, nn.LayerNorm)
               for m in net.modules())


# --------------------------------------------------------------------------- padding
@pytest.mark.parametrize("kind", KINDS)
def test_padding_content_and_amount_do_not_reach_valid_rows(kind):
    net = small_net(kind)
    x, t, lengths = batch(lengths=(5, 9), length=12)
    valid = torch.arange(12)[None, :] < lengths[:, None]
    with torch.no_grad():
        out = net(x, t, lengths)
        noisy = torch.where(valid[..., None], x, 100 * torch.randn_like(x))
        out_noisy = net(noisy, t, lengths)
        longer = torch.cat([x, 50 * torch.randn(2, 4, 3)], dim=1)
        out_longer = net(longer, t, lengths)
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))
    assert torch.equal(out_noisy[~valid], torch.zeros_like(out_noisy[~valid]))
    assert torch.equal(out_longer[:, 12:], torch.zeros(2, 4, 3))
    assert out[valid].abs().min() > 0
    torch.testing.assert_close(out_noisy[valid], out[valid], rtol=0, atol=1e-6)
    torch.testing.assert_close(out_longer[:, :12][valid], out[valid], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_each_sequence_is_independent_of_the_batch(kind):
    net = small_net(kind)
    x, t, lengths = batch(lengths=(5, 9), length=12)
    with torch.no_grad():
        both = net(x, t, lengths)
        alone = net(x[1:, :9], t[1:], lengths[1:])
    torch.testing.assert_close(both[1:, :9], alone, rtol=0, atol=1e-6)


def test_velocity_ignores_padding():
    net = small_net("gru")
    x, _, lengths = batch(lengths=(5, 12), length=12)
    mask = torch.arange(12)[None, :] < lengths[:, None]
    features = net.features(x, mask)
    assert features.shape == (2, 12, 5)
    torch.testing.assert_close(features[1, 1:, 2:4], x[1, 1:, :2] - x[1, :-1, :2])
    assert torch.equal(features[:, 0, 2:4], torch.zeros(2, 2))
    torch.testing.assert_close(features[..., 4], x[..., 2] * mask)
    assert torch.equal(features[0, 5:], torch.zeros(7, 5))


def test_zero_length_sequence_gives_zeros_and_finite_gradients():
    for kind in KINDS:
        net = small_net(kind).train()
        x, t, _ = batch()
        x.requires_grad_(True)
        out = net(x, t, torch.tensor([0, 7]))
        assert torch.equal(out[0], torch.zeros(12, 3))
        out.square().sum().backward()
        assert torch.isfinite(x.grad).all() and torch.equal(x.grad[0], torch.zeros(12, 3))


# --------------------------------------------------------------------------- BiGRU
def load_from_torch_gru(ours: BiGRU, gru: nn.GRU) -> None:
    """Copies nn.GRU's weights (gate order r, z, n in both weight_ih and weight_hh) into ``ours``."""
    with torch.no_grad():
        for k, layer in enumerate(ours.layers):
            for direction, suffix in ((layer.fwd, ""), (layer.bwd, "_reverse")):
                direction.input_proj.weight.copy_(getattr(gru, f"weight_ih_l{k}{suffix}"))
                direction.input_proj.bias.copy_(getattr(gru, f"bias_ih_l{k}{suffix}"))
                direction.recurrent_proj.weight.copy_(getattr(gru, f"weight_hh_l{k}{suffix}"))
                direction.recurrent_proj.bias.copy_(getattr(gru, f"bias_hh_l{k}{suffix}"))


def test_bigru_matches_torch_gru():
    gru = nn.GRU(7, 16, num_layers=2, batch_first=True, bidirectional=True)
    ours = BiGRU(7, 16, num_layers=2)
    load_from_torch_gru(ours, gru)
    x = torch.randn(3, 11, 7)
    with torch.no_grad():
        expected, _ = gru(x)
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x, torch.ones(3, 11, dtype=torch.bool)), expected, rtol=0, atol=1e-5)


def test_bigru_with_mask_matches_torch_gru_on_packed_sequences():
    gru = nn.GRU(7, 16, num_layers=2, batch_first=True, bidirectional=True)
    ours = BiGRU(7, 16, num_layers=2)
    load_from_torch_gru(ours, gru)
    x, lengths = torch.randn(3, 11, 7), torch.tensor([4, 11, 7])
    mask = torch.arange(11)[None, :] < lengths[:, None]
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        expected, _ = nn.utils.rnn.pad_packed_sequence(gru(packed)[0], batch_first=True, total_length=11)
        torch.testing.assert_close(ours(x, mask), expected, rtol=0, atol=1e-5)


def test_information_flows_backwards():
    net = small_net("gru")
    x, t, lengths = batch(lengths=(5, 9), length=12)
    changed = x.clone()
    changed[1, 8] += 1.0  # the last valid point of the second sequence
    with torch.no_grad():
        out, out_changed = net(x, t, lengths), net(changed, t, lengths)
    assert (out_changed[1, :3] - out[1, :3]).abs().max() > 1e-6
    torch.testing.assert_close(out_changed[0], out[0], rtol=0, atol=0)


# --------------------------------------------------------------------------- time
def test_time_embedding_is_seeded_and_sensitive():
    torch.manual_seed(1)
    a = FourierTimeEmbedding(8, 1000, seed=0)
    torch.manual_seed(2)
    b = FourierTimeEmbedding(8, 1000, seed=0)
    assert torch.equal(a.freqs, b.freqs) and "freqs" in dict(a.named_buffers())
    assert not torch.equal(a.freqs, FourierTimeEmbedding(8, 1000, seed=1).freqs)
    t = torch.tensor([0, 1, 500, 999])
    emb = a(t)
    assert emb.shape == (4, 8)
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(4), torch.ones(4)]))
    torch.testing.assert_close(emb.square().view(4, 2, 4).sum(1), torch.ones(4, 4))  # sin^2 + cos^2
    assert (emb[1:] - emb[:-1]).abs().amax(dim=1).min() > 1e-4
    torch.manual_seed(3)
    first = ChiroDiffNet("gru", hidden_size=16, num_layers=1).time_embedding.freqs
    torch.manual_seed(4)
    assert torch.equal(first, ChiroDiffNet("gru", hidden_size=16, num_layers=1).time_embedding.freqs)


@pytest.mark.parametrize("kind", KINDS)
def test_different_timesteps_give_different_outputs(kind):
    net = small_net(kind)
    x, _, lengths = batch()
    with torch.no_grad():
        early, late = net(x, torch.tensor([10, 10]), lengths), net(x, torch.tensor([900, 900]), lengths)
        scalar = net(x, 10, lengths)
    assert (early - late).abs().max() > 1e-4
    torch.testing.assert_close(scalar, early)


# --------------------------------------------------------------------------- sampling
def test_sampling_feeds_the_network_bounded_batches_and_gives_the_same_strokes():
    from sparse_diffusion.diffusion import StrokeDiffusion, make_scheduler

    task = StrokeDiffusion(small_net("gru"), make_scheduler(), torch.ones(13))  # lengths 1..12
    sizes = []
    task.net.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    one_call = task.sample(10, torch.Generator().manual_seed(0), steps=3, batch_size=10)
    assert sizes == [10] * 3
    sizes.clear()
    batched = task.sample(10, torch.Generator().manual_seed(0), steps=3, batch_size=4)
    assert sizes == [4, 4, 2] * 3
    assert torch.equal(batched[1], one_call[1])  # the same lengths
    torch.testing.assert_close(batched[0], one_call[0], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- sparsify
@pytest.mark.parametrize("kind, kwargs", [
    ("gru", dict(hidden_size=32, num_layers=2)),
    ("transformer", dict(hidden_size=64, num_layers=2, num_heads=4)),
])
def test_sparsify_converts_every_divisible_projection(kind, kwargs):
    net = ChiroDiffNet(kind, **kwargs)
    before = linear_names(net)
    report = sd.sparsify(net, 0.5, block_size=16, keep_dense=[])
    reported = {layer.name: layer for layer in report.layers}
    assert set(reported) == set(before)
    modules = dict(net.named_modules())
    for name in before:
        if reported[name].sparse:
            assert isinstance(modules[name], sk.BlockSparseLinear), name
        else:  # only for divisibility, and only outside the backbone
            assert "not divisible" in reported[name].path, (name, reported[name].path)
            assert type(modules[name]) is nn.Linear and not name.startswith("backbone.")
    backbone = [name for name in before if name.startswith("backbone.")]
    assert backbone and all(reported[name].sparse for name in backbone)
    dense = sorted(name for name in before if not reported[name].sparse)
    assert dense == ["head", "input_proj", "time_mlp.0", "time_mlp.2"]

    x, t, lengths = batch()
    x.requires_grad_(True)
    out = net(x, t, lengths)
    assert torch.equal(out[0, 5:], torch.zeros(7, 3))
    out.square().sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- errors
def test_constructor_errors():
    with pytest.raises(ValueError, match="'lstm'"):
        ChiroDiffNet("lstm")
    with pytest.raises(ValueError, match="hidden_size=30, num_heads=4"):
        ChiroDiffNet("transformer", hidden_size=30, num_heads=4)
    ChiroDiffNet("gru", hidden_size=30, num_heads=4)  # heads do not matter to the GRU
    with pytest.raises(ValueError, match="7"):
        ChiroDiffNet(time_features=7)
    with pytest.raises(ValueError, match="0"):
        ChiroDiffNet(num_layers=0)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_errors(kind):
    net = small_net(kind)
    x, t, lengths = batch()
    with pytest.raises(ValueError, match=r"\(2, 12, 2\)"):
        net(x[..., :2], t, lengths)
    with pytest.raises(ValueError, match=r"\(12, 3\)"):
        net(x[0], t, lengths)
    with pytest.raises(ValueError, match=r"lengths must be \[B\] = \[2\], got shape \(3,\)"):
        net(x, t, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        net(x, t, lengths[:, None])
    with pytest.raises(ValueError, match=r"\[5, 13\]"):
        net(x, t, torch.tensor([5, 13]))
    with pytest.raises(ValueError, match=r"\[-1, 4\]"):
        net(x, t, torch.tensor([-1, 4]))
    with pytest.raises(ValueError, match="float32"):
        net(x, t, lengths.float())
    with pytest.raises(ValueError, match=r"timesteps must be \[B\] = \[2\], got shape \(3,\)"):
        net(x, torch.tensor([1, 2, 3]), lengths)
