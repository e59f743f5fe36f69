"""The `radixserve` command line and the server settings (no server is started here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from radixserve.server.cli import API_KEY_ENV, build_parser, engine_kwargs, main, settings_from_args
from radixserve.server.settings import ServerSettings, parse_size


def test_serve_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ["--model", "--host", "--port", "--api-key", "--page-size", "--context-length", "--max-running",
                 "--max-waiting", "--max-body-size", "--log-level", "--served-model-name", "--graceful-shutdown-timeout"]:
        assert flag in out, flag


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "radixserve.server", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--served-model-name" in r.stdout


def test_defaults_leave_engine_defaults_alone(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    args = build_parser().parse_args(["serve"])
    settings = settings_from_args(args)
    assert (settings.host, settings.port, settings.api_key, settings.max_body_bytes) == ("127.0.0.1", 8000, None, 16 << 20)
    assert args.model == "default" and engine_kwargs(args) == {}


def test_flags_map_to_settings_and_engine(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    args = build_parser().parse_args([
        "serve", "--model", "m", "--host", "0.0.0.0", "--port", "9000", "--page-size", "16", "--context-length", "4096",
        "--max-running", "8", "--max-waiting", "32", "--max-body-size", "2MiB", "--log-level", "debug",
        "--served-model-name", "my-model", "--model-alias", "a", "--model-alias", "b", "--disable-prefix-cache",
        "--graceful-shutdown-timeout", "5", "--decode-burst", "4",
    ])
    settings = settings_from_args(args)
    assert settings.api_key == "from-env"  # from the environment when the flag is absent
    assert (settings.host, settings.port, settings.max_body_bytes, settings.log_level) == ("0.0.0.0", 9000, 2 << 20, "debug")
    assert settings.served_model_name == "my-model" and settings.model_aliases == ("a", "b")
    assert settings.graceful_shutdown_s == 5
    assert engine_kwargs(args) == {"page_size": 16, "max_model_len": 4096, "max_running": 8, "max_waiting": 32,
                                   "decode_burst": 4, "enable_prefix_cache": False}
    args = build_parser().parse_args(["serve", "--api-key", "flag"])
    assert settings_from_args(args).api_key == "flag"


def test_structured_output_flags_reach_the_engine_config():
    args = build_parser().parse_args(["serve", "--json-max-items", "8", "--json-max-string-length", "128",
                                      "--json-max-whitespace", "0"])
    limits = engine_kwargs(args)["constraints"]
    assert (limits.json_max_items, limits.json_max_string_length, limits.json_max_properties) == (8, 128, None)
    assert limits.json_max_whitespace == 0 and limits.bounds_json


@pytest.mark.parametrize("argv", [["serve", "--port", "70000"], ["serve", "--max-body-size", "lots"],
                                  ["serve", "--log-level", "loud"], ["serve", "--page-size", "0"],
                                  ["serve", "--json-max-items", "0"], []])
def test_invalid_flags_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_parse_size():
    assert parse_size("1048576") == 1 << 20
    assert parse_size("512KiB") == 512 << 10 and parse_size("16MB") == 16 << 20 and parse_size("1g") == 1 << 30
    with pytest.raises(ValueError):
        parse_size("12 parsecs")


@pytest.mark.parametrize("kwargs", [
    {"port": -1}, {"host": ""}, {"api_key": "  "}, {"max_body_bytes": 10}, {"graceful_shutdown_s": -1},
    {"log_level": "chatty"}, {"served_model_name": ""}, {"model_aliases": ("",)}, {"default_max_tokens": 0},
])
def test_settings_validation(kwargs):
    with pytest.raises(ValueError):
        ServerSettings(**kwargs)
