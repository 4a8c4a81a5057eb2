"""config.toml: defaults, the shipped file, strict keys and types, ranges, relative paths."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engine.config import (GradcamSettings, Settings, build_section, load_settings, replace)
from engine.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings(None)
    assert isinstance(s, Settings) and s.source is None
    assert s.inference.batch_size == 32
    assert s.gradcam.outputs == ("gray", "heatmap", "overlay")
    assert s.gradcam.active_outputs == s.gradcam.outputs
    assert s.decode.max_image_pixels == 40_000_000
    assert s.device.device == "auto"
    assert s.model.path == tmp_path.resolve() / "models" / "cat_dog_model.keras"
    assert s.paths.inbox.is_absolute() and s.paths.outbox.is_absolute()


def _engine_sections(s: Settings) -> dict:
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(s)
            if f.name not in ("extra_sections", "source", "base_dir")}


def test_repo_config_loads_and_equals_the_defaults(monkeypatch):
    shipped = load_settings(REPO / "config.toml")
    assert shipped.source == REPO / "config.toml"
    assert shipped.base_dir == REPO
    monkeypatch.chdir(REPO)  # defaults resolve relative paths against the current folder
    defaults = load_settings(None)
    # the shipped file documents every engine setting with its default value
    assert _engine_sections(shipped) == _engine_sections(defaults)


def test_empty_file_gives_defaults(tmp_path):
    s = load_settings(write(tmp_path, "# nothing\n"))
    assert s.inference == load_settings(None).inference
    assert s.model.path == tmp_path.resolve() / "models" / "cat_dog_model.keras"


def test_values_are_read_and_typed(tmp_path):
    s = load_settings(write(tmp_path, """
[inference]
batch_size = 8
uncertain_below = 1        # an int is accepted for a float
[gradcam]
outputs = ["overlay"]
enabled = false
colormap = "turbo"
overlay_alpha = 0.3
format = "png"
[decode]
reduced_jpeg = false
[device]
device = "gpu:1"
"""))
    assert s.inference.batch_size == 8
    assert s.inference.uncertain_below == 1.0 and isinstance(s.inference.uncertain_below, float)
    assert s.gradcam.outputs == ("overlay",) and s.gradcam.active_outputs == ()
    assert s.gradcam.colormap == "turbo" and s.gradcam.format == "png"
    assert s.decode.reduced_jpeg is False
    assert s.device.device == "gpu:1"


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "[inference]\nbatch_sise = 8\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "batch_sise" in message and str(path) in message and "[inference]" in message
    assert "batch_size" in message  # lists the known keys


def test_unknown_section_and_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="infrence") as info:
        load_settings(write(tmp_path, "[infrence]\nbatch_size = 8\n"))
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ConfigError, match="batch_size"):
        load_settings(write(tmp_path, "batch_size = 8\n", "top.toml"))
    with pytest.raises(ConfigError, match="table"):
        load_settings(write(tmp_path, "gradcam = 3\n", "scalar.toml"))


@pytest.mark.parametrize("section,key,value", [
    ("inference", "batch_size", '"32"'),
    ("inference", "batch_size", "true"),
    ("inference", "batch_size", "32.0"),
    ("inference", "uncertain_below", '"0.6"'),
    ("inference", "uncertain_below", "false"),
    ("decode", "reduced_jpeg", "1"),
    ("decode", "max_image_pixels", "[1]"),
    ("gradcam", "outputs", '"overlay"'),
    ("gradcam", "outputs", "[1, 2]"),
    ("gradcam", "enabled", '"yes"'),
    ("gradcam", "max_side", "512.5"),
    ("model", "path", "3"),
    ("model", "path", '""'),
    ("paths", "inbox", "{ a = 1 }"),
    ("device", "device", "0"),
])
def test_wrong_type_names_the_key(tmp_path, section, key, value):
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert f"`{key}`" in message and str(path) in message, message


@pytest.mark.parametrize("section,key,value,fragment", [
    ("inference", "batch_size", "0", "between"),
    ("inference", "batch_size", "-4", "between"),
    ("inference", "decode_threads", "-1", "between"),
    ("inference", "uncertain_below", "1.5", "[0, 1]"),
    ("gradcam", "overlay_alpha", "2", "[0, 1]"),
    ("gradcam", "overlay_alpha", "-0.1", "[0, 1]"),
    ("gradcam", "colormap", '"rainbow"', "jet"),
    ("gradcam", "outputs", '["gray", "gray"]', "twice"),
    ("gradcam", "outputs", '["grey"]', "'grey'"),
    ("gradcam", "format", '"gif"', "jpg"),
    ("gradcam", "max_side", "8", "between"),
    ("gradcam", "jpeg_quality", "101", "between"),
    ("decode", "max_image_pixels", "0", "positive"),
    ("decode", "max_file_bytes", "-1", "positive"),
    ("device", "device", '"tpu"', "gpu:N"),
    ("device", "device", '"gpu:x"', "gpu:N"),
])
def test_out_of_range_values(tmp_path, section, key, value, fragment):
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert f"`{key}`" in message and fragment in message and str(path) in message, message


def test_in_range_edges_are_accepted(tmp_path):
    s = load_settings(write(tmp_path, """
[inference]
batch_size = 1
uncertain_below = 0
[gradcam]
overlay_alpha = 1.0
outputs = []
max_side = 16
jpeg_quality = 100
[device]
device = "gpu:0"
"""))
    assert s.inference.batch_size == 1 and s.gradcam.outputs == () and s.gradcam.max_side == 16


@pytest.mark.parametrize("text", [
    "[inference\nbatch_size = 8\n",
    "[inference]\nbatch_size = \n",
    "[inference]\nbatch_size = 8\nbatch_size = 9\n",
    "[gradcam]\noutputs = [\"gray\"\n",
])
def test_invalid_toml(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "TOML" in str(info.value) and str(path) in str(info.value)


def test_non_utf8_file_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("[model]\npath = \"caf\u00e9.keras\"\n".encode("latin-1"))
    with pytest.raises(ConfigError):
        load_settings(path)


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "etc" / "pawcam"
    folder.mkdir(parents=True)
    path = write(folder, """
[model]
path = "../models/m.keras"
[paths]
inbox = "in"
outbox = "/abs/out"
""")
    monkeypatch.chdir(tmp_path)  # somewhere else: must not matter
    s = load_settings(Path("etc/pawcam/config.toml"))
    assert s.model.path == (tmp_path / "etc" / "models" / "m.keras").resolve()
    assert s.paths.inbox == (folder / "in").resolve()
    assert s.paths.outbox == Path("/abs/out")
    assert s.base_dir == folder.resolve()


def test_missing_explicit_file_is_an_error_implicit_gives_defaults(tmp_path, monkeypatch):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(missing)
    assert str(missing) in str(info.value) and "--config" in str(info.value)
    monkeypatch.chdir(tmp_path)
    s = load_settings(missing, required=False)
    assert s.source is None
    assert _engine_sections(s) == _engine_sections(load_settings(None))
    with pytest.raises(ConfigError):  # a folder is not a config file
        load_settings(tmp_path)


def test_extra_sections_are_passed_through_unvalidated(tmp_path):
    s = load_settings(write(tmp_path, "[watcher]\npoll = 2\n[training]\nepochs = 3\n"))
    assert s.extra_sections == {"watcher": {"poll": 2}, "training": {"epochs": 3}, "serve": {}}


def test_build_section_for_other_packages(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class WatcherLike:
        poll_seconds: float = 1.0
        folder: Path = Path("inbox")
        tags: tuple[str, ...] = ()

    got = build_section(WatcherLike, {"poll_seconds": 2, "folder": "x", "tags": ["a"]},
                        "watcher", tmp_path / "c.toml", tmp_path)
    assert got == WatcherLike(2.0, (tmp_path / "x").resolve(), ("a",))
    with pytest.raises(ConfigError, match="poll"):
        build_section(WatcherLike, {"pol": 1}, "watcher", tmp_path / "c.toml", tmp_path)
    with pytest.raises(ConfigError, match="`tags`"):
        build_section(WatcherLike, {"tags": "a"}, "watcher", tmp_path / "c.toml", tmp_path)


def test_replace_makes_a_modified_copy():
    s = load_settings(None)
    g = replace(s.gradcam, max_side=64)
    assert isinstance(g, GradcamSettings) and g.max_side == 64 and s.gradcam.max_side == 512
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.gradcam.max_side = 1  # type: ignore[misc]
