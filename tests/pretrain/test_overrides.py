"""Recipe overrides: every setting through --set and --config, typed parsing, one-line refusals,
the run's config.json as a --config, and hints that name real flags."""

import json
import re
import typing
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from lvd.cli.main import main
from lvd.flows.pretrain_launch import RanksCommand
from lvd.pretrain.failures import oom_message
from lvd.pretrain.overrides import OverrideError, resolve_recipe, settings
from lvd.pretrain.recipes import Recipe, get_recipe, tiny

# Values that differ from `tiny`'s and that the recipe's checks accept; other settings get a
# generic new value of their type (see `_other`).
SPECIAL = {
    "backbone.arch": "vit_small",
    "backbone.patch_size": 7,
    "loss.centering": "centering",
    "crops.global_size": 70,
    "crops.local_size": 42,
    "crops.global_scale": (0.4, 0.9),
    "crops.local_scale": (0.1, 0.3),
    "masks.ratio_min": 0.2,
    "masks.ratio_max": 0.6,
    "distill.teacher": "/some/teacher.pth",
    "distill.teacher_arch": "vit_base",
    "backbone.drop_path_rate": 0.25,
    "name": "mine",
    "phase.from_run": "/some/run",
}


def _get(recipe: Recipe, name: str):
    value = recipe
    for part in name.split("."):
        value = getattr(value, part)
    return value


def _other(name: str, kind, current):
    if name in SPECIAL:
        return SPECIAL[name]
    if kind is bool:
        return not current
    if kind is int:
        return current + 3
    if kind is float:
        return round(current * 0.5 + 0.0625, 6)
    raise AssertionError(f"no test value for {name} ({kind}): add it to SPECIAL")


def _as_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


NEW = {name: _other(name, kind, _get(tiny(), name)) for name, kind in settings().items()}


def test_settings_cover_every_field_of_every_section():
    fields = set()
    for name, kind in typing.get_type_hints(Recipe).items():
        if hasattr(kind, "__dataclass_fields__"):
            fields |= {f"{name}.{f}" for f in kind.__dataclass_fields__}
        else:
            fields.add(name)
    assert set(settings()) == fields and len(fields) > 50


@pytest.mark.parametrize("name", sorted(NEW))
def test_set_changes_exactly_that_setting(name):
    value = NEW[name]
    assert value != _get(tiny(), name)
    got = resolve_recipe("tiny", sets=[f"{name}={_as_text(value)}"])
    assert _get(got, name) == value
    # nothing else moved
    for other in NEW:
        if other != name:
            assert _get(got, other) == _get(tiny(), other), other


def test_config_file_sets_all_at_once_and_set_wins_over_it(tmp_path):
    nested: dict = {}
    for name, value in NEW.items():
        if name.startswith("backbone.patch") or name.startswith("crops.") and name.endswith("_size"):
            continue  # patch and crop sizes are checked together; set separately above
        section, _, field = name.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[field] = (
            list(value) if isinstance(value, tuple) else value
        )
    for suffix, dump in ((".yaml", yaml.safe_dump), (".json", json.dumps)):
        path = tmp_path / f"c{suffix}"
        path.write_text(dump(nested))
        got = resolve_recipe("tiny", config=path, sets=["optim.base_lr=0.5"])
        for name, value in NEW.items():
            if name == "optim.base_lr":
                assert got.optim.base_lr == 0.5
            elif name.rpartition(".")[2] in nested.get(name.rpartition(".")[0], nested):
                assert _get(got, name) == value, name


def test_a_runs_config_json_gives_back_its_recipe(tmp_path):
    r = resolve_recipe("tiny", sets=["crops.n_local=3", "optim.base_lr=1e-3", "batch_size=6"])
    (tmp_path / "config.json").write_text(r.to_json())  # what train() writes
    assert resolve_recipe("vits14", config=tmp_path / "config.json") == r


def test_values_are_typed_and_bad_ones_refused_in_one_line():
    r = resolve_recipe(
        "tiny", sets=["loss.separate_ibot_head=yes", "optim.base_lr=4e-3", "crops.local_scale=(0.1, 0.2)", "epochs=7"]
    )
    assert r.loss.separate_ibot_head is True and r.optim.base_lr == 0.004
    assert r.crops.local_scale == (0.1, 0.2) and isinstance(r.epochs, int)
    for bad, expected in [
        ("crops.n_local=four", "want an integer"),
        ("epochs=2.5", "want an integer"),
        ("optim.base_lr=fast", "want a number"),
        ("loss.separate_ibot_head=maybe", "true or false"),
        ("crops.local_scale=0.1", "2 comma-separated"),
        ("backbone.drop_path_rate=1.5", "[0, 1)"),
        ("backbone.arch=vit_huge", "unknown arch"),
        ("crops.local_scale=0.3,0.1", "min <= max"),
        ("crops.n_local=-1", "n_local >= 0"),
        ("loss.centering=none", "centering must be"),
        ("crops.global_size=50", "multiple of patch size"),
        ("crops.n_local", "SECTION.FIELD=VALUE"),
    ]:
        with pytest.raises(OverrideError, match=re.escape(expected)) as e:
            resolve_recipe("tiny", sets=[bad])
        assert "\n" not in str(e.value) and str(e.value).startswith(f"--set {bad}")


def test_unknown_keys_name_the_closest_valid_ones(tmp_path):
    for key, near in [
        ("crops.nlocal", "crops.n_local"),
        ("n_local", "crops.n_local"),
        ("optim.lr", "optim.min_lr"),
        ("teacher.temperature", "teacher.temp"),
        ("batchsize", "batch_size"),
    ]:
        with pytest.raises(OverrideError, match=re.escape(near)) as e:
            resolve_recipe("tiny", sets=[f"{key}=1"])
        assert "\n" not in str(e.value) and f"unknown recipe setting {key!r}" in str(e.value)
    (tmp_path / "c.yaml").write_text("crops:\n  nlocal: 2\n")
    with pytest.raises(
        OverrideError,
        match=r"--config .*c.yaml: unknown recipe setting 'crops.nlocal'; "
        r"did you mean crops.n_local",
    ):
        resolve_recipe("tiny", config=tmp_path / "c.yaml")
    (tmp_path / "s.yaml").write_text("crops: 4\n")
    with pytest.raises(OverrideError, match="is a section"):
        resolve_recipe("tiny", config=tmp_path / "s.yaml")
    (tmp_path / "bad.json").write_text("{crops")
    with pytest.raises(OverrideError, match="not valid JSON"):
        resolve_recipe("tiny", config=tmp_path / "bad.json")


def test_cli_refuses_a_wrong_key_with_one_line_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "pretrain",
                "--shards",
                str(tmp_path / "none"),
                "--recipe",
                "tiny",
                "--out",
                str(tmp_path / "o"),
                "--set",
                "crops.nlocal=2",
            ]
        )
    msg = str(e.value)
    assert msg == (
        "lvd pretrain: error: --set crops.nlocal=2: unknown recipe setting "
        "'crops.nlocal'; did you mean crops.n_local, crops.local_size, crops.local_scale?"
    )
    assert not (tmp_path / "o").exists()


def test_the_run_records_the_overridden_recipe(tmp_path):
    from lvd.datasets import load_fashion_mnist, write_shards

    x, _ = load_fashion_mnist("test")
    write_shards(x[:16], tmp_path / "shards", samples_per_shard=16, size=56)
    (tmp_path / "c.yaml").write_text("crops: {n_local: 1}\noptim: {base_lr: 0.001}\n")
    rc = main(
        [
            "pretrain",
            "--shards",
            str(tmp_path / "shards"),
            "--recipe",
            "tiny",
            "--out",
            str(tmp_path / "run"),
            "--config",
            str(tmp_path / "c.yaml"),
            "--set",
            "masks.ratio_max=0.4",
            "--batch-size",
            "4",
            "--max-steps",
            "1",
            "--num-workers",
            "0",
        ]
    )
    assert rc == 0
    saved = Recipe.from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    expected = replace(
        tiny(),
        batch_size=4,
        crops=replace(tiny().crops, n_local=1),
        optim=replace(tiny().optim, base_lr=0.001),
        masks=replace(tiny().masks, ratio_max=0.4),
    )
    assert saved == expected


def test_every_flag_in_the_oom_hint_is_real():
    msg = oom_message(get_recipe("vitl14"), world_size=8, step=3, bf16=True)
    sets = re.findall(r"--set (\S+?=[^\s;)]+)", msg)
    assert "crops.n_local=8" in sets and "crops.n_local=4" in sets
    resolve_recipe("vitl14", sets=sets)  # each parses and applies
    flags = set(re.findall(r"(--[a-z][a-z-]+)", msg))
    from lvd.cli.main import build_parser

    pretrain = build_parser()._subparsers._group_actions[0].choices["pretrain"]
    known = {s for a in pretrain._actions for s in a.option_strings}
    assert flags <= known, flags - known


def test_the_flows_multi_rank_command_passes_the_overrides_on(tmp_path):
    spec = RanksCommand(
        shards=("s",),
        recipe="tiny",
        out=tmp_path,
        nproc_per_node=2,
        config="c.yaml",
        sets=("crops.n_local=2", "optim.base_lr=1e-3"),
        init="w.pth",
        distill_from="t.pth",
    )
    cmd = spec.command(resume=False)
    for pair in (
        ["--config", "c.yaml"],
        ["--set", "crops.n_local=2"],
        ["--set", "optim.base_lr=1e-3"],
        ["--init", "w.pth"],
        ["--distill-from", "t.pth"],
    ):
        assert any(cmd[i : i + 2] == pair for i in range(len(cmd))), pair


def test_help_lists_the_new_flags(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    for flag in ("--config FILE", "--set SECTION.FIELD=VALUE", "--init SPEC", "--distill-from SPEC"):
        assert flag in out


def test_paths_are_kept_as_strings():
    r = resolve_recipe("tiny", distill_from=Path("/x/y.pth"))
    assert r.distill.teacher == "/x/y.pth" and r.distill.enabled


def test_the_nan_hint_names_real_settings():
    import torch

    from lvd.pretrain.meta_arch import LossTerms, StepOutput
    from lvd.pretrain.train import NonFiniteLossError, check_finite

    nan = torch.tensor(float("nan"))
    with pytest.raises(NonFiniteLossError) as e:
        check_finite(StepOutput(LossTerms(nan, nan, nan, nan), 0.0, 0.0), 3)
    named = re.findall(r"--set (\S+?)=", str(e.value))
    assert named == ["optim.base_lr", "teacher.temp"] and set(named) <= set(settings())
