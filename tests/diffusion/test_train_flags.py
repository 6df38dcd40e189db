"""``sparse-diffusion train``'s flags are generated from TrainConfig's fields: each field is one
flag with its help, default and choices, declared once on the field; validate() checks the same
choices; a grid's command line (study.launch) parses back into the run it describes."""
import argparse
import dataclasses

import pytest

from sparse_diffusion import cli
from sparse_diffusion.config import METHODS, PRECISIONS, TrainConfig, flag, setting_type
from sparse_diffusion.study.launch import train_command

FIELDS = dataclasses.fields(TrainConfig)
CHOICES = [f for f in FIELDS if "choices" in f.metadata]


def _train_parser() -> argparse.ArgumentParser:
    (commands,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices["train"]


def _actions():
    return {a.dest: a for a in _train_parser()._actions}


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_setting_is_a_train_flag_with_its_help_and_default(field):
    action = _actions()[field.name]
    assert action.option_strings[0] == flag(field.name) == "--" + field.name.replace("_", "-")
    assert action.help == field.metadata["help"] and action.help.strip()
    if field.name == "out":  # the run folder is always given on the command line
        assert action.required
    else:
        assert action.default == field.default and not action.required
    kind = setting_type(field)
    if "parse" in field.metadata:  # its own parser (a block shape): argparse gets it, errors in one line
        assert kind is field.metadata["parse"] and callable(action.type)
        assert action.type(str(field.default)) == field.default
        with pytest.raises(argparse.ArgumentTypeError):
            action.type("not a value")
        return
    assert kind in (int, float, str, bool)
    if kind is bool:
        assert isinstance(action, argparse.BooleanOptionalAction)
        assert action.option_strings == [flag(field.name), "--no-" + flag(field.name)[2:]]
    else:
        assert action.type is (None if kind is str else kind)


def test_the_flags_are_the_settings_and_resume():
    assert set(_actions()) == {f.name for f in FIELDS} | {"help", "resume"}


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_a_choice_is_declared_once_on_its_field(field):
    """The parser offers exactly the field's choices; a field without them offers none."""
    choices = _actions()[field.name].choices
    assert (tuple(choices) if choices is not None else None) == field.metadata.get("choices")


def test_the_choice_lists_are_the_librarys_own():
    by_name = {f.name: f.metadata.get("choices") for f in FIELDS}
    assert by_name["method"] == tuple(sorted(METHODS)) and by_name["precision"] == PRECISIONS
    assert by_name["distribution"] == ("uniform", "er", "erk") and by_name["chirodiff_kind"] == ("gru", "transformer")
    assert by_name["preset"] == ("tiny", "demo", "small", "paper") and by_name["dist_backend"] == ("nccl", "gloo")


@pytest.mark.parametrize("field", CHOICES, ids=lambda f: f.name)
def test_validate_refuses_a_value_outside_the_fields_choices(field):
    allowed = field.metadata["choices"]
    with pytest.raises(ValueError, match=f"{flag(field.name)} must be one of {', '.join(allowed)}; got 'nope'"):
        TrainConfig(**{field.name: "nope"}).validate()
    for value in allowed:
        settings = {"autoencoder": "ae"} if value == "ldm" else {}
        TrainConfig(**{field.name: value}, **settings).validate()


def test_the_parser_refuses_a_value_outside_the_choices(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--out", "r", "--sampler", "euler"])
    assert "argument --sampler: invalid choice: 'euler'" in capsys.readouterr().err


def test_the_types_come_from_the_annotations():
    args = cli.build_parser().parse_args(["train", "--out", "r", "--steps", "7", "--lr", "0.5", "--grad-clip", "1",
                                          "--image-size", "16", "--no-regrow-dropped", "--dist-backend", "gloo"])
    assert (args.steps, args.lr, args.grad_clip, args.image_size) == (7, 0.5, 1.0, 16)
    assert type(args.steps) is int and type(args.grad_clip) is float
    assert args.regrow_dropped is False and args.dist_backend == "gloo" and args.limit is None and not args.resume


def test_a_runs_command_line_trains_exactly_that_run():
    """study.launch writes a command from a config; the generated parser reads back the same config,
    None settings (the command's defaults) and booleans (--no-x) included."""
    config = TrainConfig(out="runs/x", model="chirodiff", dataset="kanjivg", method="magran", sparsity=0.75,
                         block_size=16, distribution="uniform", regrow_dropped=False, grad_clip=0.5,
                         precision="bf16", preset="tiny", chirodiff_kind="transformer", prediction="v",
                         sampler="ddpm", limit=32, dist_backend="gloo")
    words = train_command(config, resume=True)
    assert words[:2] == ["sparse-diffusion", "train"]
    args = cli.build_parser().parse_args(words[1:])
    assert TrainConfig(**{f.name: getattr(args, f.name) for f in FIELDS}) == config and args.resume


@pytest.mark.parametrize("text, value, pair", [("16", 16, (16, 16)), ("16x16", 16, (16, 16)), ("16x1", "16x1", (16, 1)),
                                               (" 8 x 1 ", "8x1", (8, 1)), ("1", 1, (1, 1))])
def test_block_shapes_are_typed_as_users_type_them(text, value, pair):
    from sparse_diffusion.config import block_pair

    args = cli.build_parser().parse_args(["train", "--block-size", text, "--out", "run"])
    assert args.block_size == value and block_pair(value) == pair
    assert TrainConfig(block_size=text).block_size == value == TrainConfig(block_size=pair).block_size


@pytest.mark.parametrize("bad", ["0", "16x0", "x1", "16x1x1", "-4", "sixteen"])
def test_a_bad_block_shape_is_a_one_line_error(bad, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--block-size", bad, "--out", "run"])
    assert "--block-size must be a positive size" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--block-size"):
        TrainConfig(block_size=bad)
