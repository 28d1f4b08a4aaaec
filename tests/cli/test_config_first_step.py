"""A config whose data a script writes names that step in its launch line; a missing data file then says to run it."""

import pytest

from trl_kto_ext.cli import offline, online


def _config(tmp_path, first_line):
    path = tmp_path / "run.yaml"
    path.write_text(f"{first_line}\nmodel_name_or_path: tiny\ndataset_name: {tmp_path / 'absent' / 'rows.jsonl'}\n")
    return str(path)


@pytest.mark.parametrize("command", [offline.main, online.main])
def test_a_missing_data_file_names_the_configs_first_step(tmp_path, command):
    config = _config(tmp_path, "# Launch: trl-kto-ext --config run.yaml     (first: python make_data.py out/)")
    argv = ["--config", config, "--output_dir", str(tmp_path / "out")]
    if command is online.main:
        argv += ["--reward_funcs", "trl_kto_ext.models.tiny.exact_answer_reward"]
    with pytest.raises(SystemExit) as stop:
        command(argv)
    message = str(stop.value)
    assert "No such file or folder" in message and "\n" not in message
    assert message.endswith(f"{config} says to run first: python make_data.py out/")


def test_no_step_is_invented_for_a_config_without_one(tmp_path):
    config = _config(tmp_path, "# Launch: trl-kto-ext --config run.yaml")
    with pytest.raises(SystemExit) as stop:
        offline.main(["--config", config, "--output_dir", str(tmp_path / "out")])
    assert "No such file or folder" in str(stop.value) and "says to run first" not in str(stop.value)
