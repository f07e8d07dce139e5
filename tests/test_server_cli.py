"""``flotilla serve`` / ``generate`` options: one per EngineConfig field, choices from the config, --config files.

No engine is started here: these tests parse command lines and check what would reach ``Engine(**kwargs)``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from flotilla import config as cfg
from flotilla.cli import build_parser, parse_args
from flotilla.config import EngineConfig
from flotilla.launch.factory import engine_kwargs, engine_options

FIELDS = [f.name for f in dataclasses.fields(EngineConfig) if f.name != "hf_config"]


def _actions(cmd: str) -> dict[str, argparse.Action]:
    _, subs = build_parser()
    return {a.dest: a for a in subs[cmd]._actions}


@pytest.mark.parametrize("cmd", ["serve", "generate"])
def test_an_option_for_every_engine_field(cmd: str) -> None:
    actions = _actions(cmd)
    dests = {opt.field: opt.dest for opt in engine_options()}
    assert sorted(dests) == sorted(FIELDS)
    for name in FIELDS:
        action = actions[dests[name]]
        meta = next(f for f in dataclasses.fields(EngineConfig) if f.name == name).metadata
        assert meta["help"] in action.help, name
        assert action.default is argparse.SUPPRESS, name  # the engine's default stays the only default


def test_choices_are_the_config_constants() -> None:
    actions = _actions("serve")
    assert actions["dtype"].choices is cfg.DTYPES
    assert actions["device"].choices is cfg.DEVICES
    assert actions["load_format"].choices is cfg.LOAD_FORMATS
    assert actions["load_balance"].choices is cfg.LOAD_BALANCE
    assert actions["attention_backend"].choices is cfg.ATTENTION_BACKENDS
    # and validate() still refuses what the CLI would refuse
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(model="m", dtype="int3")


def test_only_passed_options_reach_the_engine(llama_path: str) -> None:
    args, _ = parse_args(["serve", "--model", llama_path, "--tp-size", "2", "--no-enable-prefix-caching",
                          "--pp-size", "2", "--pp-layer-partition", "1", "1", "--engine-seed", "7",
                          "--engine-host", "10.0.0.1", "--gpu-memory-utilization", "0.5"])
    assert engine_kwargs(args) == {"tp_size": 2, "enable_prefix_caching": False, "pp_size": 2,
                                   "pp_layer_partition": [1, 1], "seed": 7, "host": "10.0.0.1",
                                   "gpu_memory_utilization": 0.5}
    assert args.host == "127.0.0.1"  # --host is the HTTP address, not EngineConfig.host
    EngineConfig(model=llama_path, **engine_kwargs(args))  # every value is one the engine accepts
    args, _ = parse_args(["serve", "--model", llama_path])
    assert engine_kwargs(args) == {}


def test_bool_options_go_both_ways(llama_path: str) -> None:
    on, _ = parse_args(["generate", "hi", "--model", llama_path, "--enable-dp-attention", "--no-enable-cuda-graph"])
    assert engine_kwargs(on) == {"enable_dp_attention": True, "enable_cuda_graph": False}
    assert on.prompt == "hi"


def test_bad_choice_is_a_usage_error(llama_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["serve", "--model", llama_path, "--dtype", "int3"])
    assert "--dtype" in capsys.readouterr().err


def test_missing_model_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["serve", "--tp-size", "2"])
    assert "--model" in capsys.readouterr().err


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "flotilla.yaml"
    path.write_text(text)
    return str(path)


def test_config_file_and_cli_overrides(tmp_path: Path, llama_path: str) -> None:
    path = _write(tmp_path, f"model: {llama_path}\ntp_size: 2\nload-format: dummy\nenable_cuda_graph: false\n"
                            "pp_layer_partition: [2, 2]\nport: 0\nserved-model-name: tiny\nengine_seed: 3\n")
    args, _ = parse_args(["serve", "--config", path, "--tp-size", "4", "--port", "9000"])
    assert engine_kwargs(args) == {"tp_size": 4, "load_format": "dummy", "enable_cuda_graph": False,
                                   "pp_layer_partition": [2, 2], "seed": 3}
    assert args.model == llama_path and args.served_model_name == "tiny" and args.port == 9000


def test_config_file_for_generate(tmp_path: Path, llama_path: str) -> None:
    path = _write(tmp_path, f"model: {llama_path}\nmax_new_tokens: 5\ntemperature: 0.5\ndp_size: 2\n")
    args, _ = parse_args(["generate", "Hello", "--config", path, "--temperature", "0"])
    assert (args.max_new_tokens, args.temperature, args.prompt) == (5, 0.0, "Hello")
    assert engine_kwargs(args) == {"dp_size": 2}


@pytest.mark.parametrize("text, words", [
    ("tp_sise: 2\n", ["tp_sise", "unknown key", "tp_size"]),
    ("tp_size: many\n", ["tp_size", "an int"]),
    ("tp_size: 2.5\n", ["tp_size", "an int"]),
    ("dtype: int3\n", ["dtype", "bfloat16"]),
    ("enable_cuda_graph: 1\n", ["enable_cuda_graph", "true or false"]),
    ("pp_layer_partition: 3\n", ["pp_layer_partition", "list"]),
    ("- tp_size\n", ["mapping"]),
    ("tp_size: [1\n", ["YAML"]),
])
def test_bad_config_file_names_the_key(tmp_path: Path, llama_path: str, capsys: pytest.CaptureFixture[str],
                                       text: str, words: list[str]) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(SystemExit) as exit_:
        parse_args(["serve", "--model", llama_path, "--config", path])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
