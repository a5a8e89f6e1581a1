"""Command-line options from config dataclasses (steprl.configargs), and the segmentation settings built with them."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Literal

import pytest
from steprl.configargs import ConfigOptions, field_docs


@dataclass
class Example:
    """A config with one field of each kind.

    Attributes:
        count: how many.
        rate: a rate in %, spread over
            two lines.
        name: a name.
        mode: one of two modes.
        flag: off unless asked.
        keep, again: two switches described at once.
        auto: None lets the program decide.
        limit: no limit unless given.
        pair: two numbers.
        sizes: any number of sizes.

    Note:
        Not a field: the section ended.
    """

    count: int = 3
    rate: float = 0.5
    name: str = "x"
    mode: Literal["fast", "slow"] = "fast"
    flag: bool = False
    keep: bool = True
    again: bool = True
    auto: bool | None = None
    limit: float | None = None
    pair: tuple[float, float] = (1.0, 2.0)
    sizes: tuple[int, ...] = (8, 16)


def _parse(options: ConfigOptions, argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser()
    options.add_to(parser)
    return parser, parser.parse_args(argv)


def test_field_docs_reads_the_attributes_section():
    docs = field_docs(Example)
    assert list(docs) == ["count", "rate", "name", "mode", "flag", "keep", "again", "auto", "limit", "pair", "sizes"]
    assert docs["rate"] == "a rate in %, spread over two lines."
    assert docs["keep"] == docs["again"] == "two switches described at once."
    assert "Not a field" not in " ".join(docs.values())

    class NoSection:
        """Just text."""

    assert field_docs(NoSection) == {}


def test_no_arguments_build_the_dataclass_defaults():
    options = ConfigOptions(Example)
    _, args = _parse(options, [])
    assert options.build(args) == Example()


def test_each_type_gets_its_option():
    options = ConfigOptions(Example)
    _, args = _parse(options, ["--count", "5", "--rate", "0.25", "--name", "y", "--mode", "slow", "--flag",
                               "--no-keep", "--again", "--auto", "--limit", "2.5", "--pair", "3", "4",
                               "--sizes", "1", "2", "3"])
    assert options.build(args) == Example(count=5, rate=0.25, name="y", mode="slow", flag=True, keep=False,
                                          again=True, auto=True, limit=2.5, pair=(3.0, 4.0), sizes=(1, 2, 3))
    assert options.build(_parse(options, ["--no-auto"])[1]).auto is False
    for bad in (["--mode", "medium"], ["--count", "1.5"], ["--pair", "1"], ["--flag", "yes"]):
        with pytest.raises(SystemExit):
            _parse(options, bad)


def test_the_help_is_the_documentation_with_the_default():
    parser, _ = _parse(ConfigOptions(Example), [])
    helps = {a.dest: a.help % {} for a in parser._actions if a.dest != "help"}
    assert helps["count"] == "how many (default: 3)"
    assert helps["rate"] == "a rate in %, spread over two lines (default: 0.5)"  # a % in the doc is escaped
    assert helps["keep"] == "two switches described at once (default: on)"
    assert helps["pair"].endswith("(default: 1.0 2.0)") and helps["sizes"].endswith("(default: 8 16)")
    assert helps["flag"] == "off unless asked." and helps["limit"] == "no limit unless given."  # no default to show
    assert helps["auto"] == "None lets the program decide."
    text = parser.format_help()
    assert "--mode {fast,slow}" in text and "--keep, --no-keep" in text and "--sizes SIZES [SIZES ...]" in text


def test_select_exclude_rename_and_metavar():
    options = ConfigOptions(Example, only=("count", "limit", "keep"), rename={"count": "n", "keep": "revival"},
                            metavar={"limit": "L"})
    assert options.names == ["count", "keep", "limit"]  # declaration order
    parser, args = _parse(options, ["--n", "7", "--no-revival"])
    assert (args.n, args.revival) == (7, False)
    assert "--limit L" in parser.format_help() and "--rate" not in parser.format_help()
    assert options.build(args, rate=0.1) == Example(count=7, keep=False, rate=0.1)
    assert ConfigOptions(Example, exclude=("sizes", "pair")).names[-1] == "limit"


def test_unset_options_leave_the_default_to_the_caller():
    options = ConfigOptions(Example, only=("count", "limit"), unset=("count",))
    parser, args = _parse(options, [])
    assert args.count is None and "(default" not in parser.format_help().split("--count COUNT")[1].split("--")[0]
    assert options.build(args).count == 3  # the dataclass default
    assert options.build(args, count=9).count == 9  # or the caller's
    assert options.build(_parse(options, ["--count", "4"])[1], count=9).count == 4  # the user's wins
    with pytest.raises(TypeError, match="limit"):
        options.build(args, limit=1.0)  # a parsed option is not overridden silently


def test_mistakes_are_found_when_the_options_are_made():
    with pytest.raises(ValueError, match="no field cont"):
        ConfigOptions(Example, only=("cont",))
    with pytest.raises(ValueError, match="no field nmae"):
        ConfigOptions(Example, rename={"nmae": "label"})

    @dataclass
    class Undocumented:
        """Only one field documented.

        Attributes:
            size: documented.
        """

        size: int = 1
        other: int = 2

    with pytest.raises(ValueError, match="document other"):
        ConfigOptions(Undocumented)
    assert ConfigOptions(Undocumented, exclude=("other",)).names == ["size"]

    @dataclass
    class Odd:
        """A field of a type with no command-line form.

        Attributes:
            table: a dict.
        """

        table: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="table"):
        _parse(ConfigOptions(Odd), [])
    with pytest.raises(TypeError, match="dataclass"):
        ConfigOptions(int)


def test_a_field_without_default_is_a_required_option():
    @dataclass
    class Required:
        """A field without default.

        Attributes:
            path: where.
            depth: how deep.
        """

        path: str
        depth: int = 2

    options = ConfigOptions(Required)
    with pytest.raises(SystemExit):
        _parse(options, [])
    assert options.build(_parse(options, ["--path", "a"])[1]) == Required("a")


def test_the_registration_network_config_fits_too():
    """General enough for SPACConfig (tuples of any length, a pair of floats, booleans, a renamed flag)."""
    from steprl.registration.networks import SPACConfig

    options = ConfigOptions(SPACConfig, rename={"zero_mean": "zero-mean-step"}, unset=("plan_dim",))
    _, args = _parse(options, [])
    assert options.build(args) == SPACConfig()
    _, args = _parse(options, ["--ndim", "3", "--grid", "64", "64", "64", "--zero-mean-step"])
    assert options.build(args, plan_dim=64) == SPACConfig(ndim=3, grid=(64, 64, 64), plan_dim=64, zero_mean=True)


# ---- the segmentation settings -------------------------------------------------------------------


def test_every_segmentation_hyper_parameter_is_an_option_with_its_one_default():
    from steprl.cli import build_parser
    from steprl.segmentation.cli_args import configs_from_args
    from steprl.segmentation.config import PA3CConfig, PixelDRLConfig, SegTrainConfig

    parser = build_parser()
    args = parser.parse_args(["train", "segmentation", "--synthetic", "32", "32", "--out", "x"])
    assert configs_from_args(args) == (SegTrainConfig(), PA3CConfig(), PixelDRLConfig())
    args = parser.parse_args(["train", "segmentation", "--synthetic", "32", "32", "--out", "x", "--iterations", "7",
                              "--gamma", "0.9", "--no-revival", "--class-balance-anneal", "200", "--widths", "4", "8",
                              "16", "32", "--fusion", "input", "--grad-clip", "1.5", "--bf16"])
    train, pa3c, network = configs_from_args(args)
    assert (train.iterations_per_epoch, train.grad_clip, train.bf16) == (7, 1.5, True)
    assert (pa3c.gamma, pa3c.allow_revival, pa3c.class_balance, pa3c.class_balance_anneal) == (0.9, False, True, 200)
    assert network == PixelDRLConfig(widths=(4, 8, 16, 32), fusion="input")


def test_segmentation_settings_by_name():
    from steprl.segmentation.config import PA3CConfig, PixelDRLConfig, SegTrainConfig, segmentation_configs

    train, pa3c, network = segmentation_configs(batch=2, t_max=3, widths=(4, 8, 16, 32))
    assert (train, pa3c, network) == (SegTrainConfig(batch=2), PA3CConfig(t_max=3),
                                      PixelDRLConfig(widths=(4, 8, 16, 32)))
    with pytest.raises(TypeError, match="gama"):
        segmentation_configs(gama=0.9)


def test_the_network_config_round_trips_through_the_card():
    from steprl.segmentation.config import PixelDRLConfig

    cfg = PixelDRLConfig(widths=(8, 16, 32, 64), fusion_width=16)
    assert cfg.head_widths == (16, 32, 64)  # twice the first three widths
    card = cfg.to_dict()
    assert card["widths"] == [8, 16, 32, 64] and PixelDRLConfig.from_dict(card) == cfg
    old_input_card = {k: v for k, v in card.items() if k not in ("fusion_width", "fusion_depth")} | {"fusion": "input"}
    assert PixelDRLConfig.from_dict(old_input_card).fusion == "input"
    for bad in ({"widths": [1, 2, 3]}, {"fusion": "middle"}, {"norm": "batch"}, {"in_channels": 1}):
        with pytest.raises(ValueError):
            PixelDRLConfig.from_dict({**card, **bad})
    with pytest.raises(TypeError):
        PixelDRLConfig.from_dict({**card, "width": 4})
    assert [f.name for f in dataclasses.fields(PixelDRLConfig)] == list(card)


def test_the_command_line_does_not_import_torch():
    code = textwrap.dedent(
        """
        import sys
        from steprl.cli import build_parser
        build_parser().parse_args(["train", "segmentation", "--synthetic", "8", "8", "--out", "x"])
        from steprl.segmentation.cli_args import configs_from_args
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
