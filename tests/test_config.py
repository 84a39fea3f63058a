from pathlib import Path

import pytest
import yaml

from preftune.config import TrainConfig, describe_keys, load_config
from preftune.errors import PreftuneError

REPO = Path(__file__).parent.parent
BASE = {"train_file": "x.jsonl"}


def test_defaults_and_round_trip(tmp_path):
    cfg = load_config(BASE)
    assert cfg.loss.beta == 0.1 and cfg.model.finetuning_type == "lora" and cfg.model.lora_r == 16
    assert cfg.data.max_length == 1024 and cfg.data.max_prompt_length is None
    path = tmp_path / "saved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path).to_flat() == cfg.to_flat()


def test_every_field_has_a_doc():
    text = describe_keys()
    for key in TrainConfig().to_flat():
        assert f"  {key} (default" in text


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"betta": 0.2}, "unknown key 'betta'; did you mean 'beta'?"),
        ({"learning_rat": 1e-5}, "did you mean 'learning_rate'?"),
        ({"beta": "high"}, "'beta' must be a number, got 'high'"),
        ({"beta": -1}, "'beta' must be > 0"),
        ({"loss_type": "sigmod"}, "unknown loss_type 'sigmod'; did you mean 'sigmoid'?"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "'loss_weights' has 1 values"),
        ({"lr_scheduler_type": "cosin"}, "did you mean 'cosine'?"),
        ({"finetuning_type": "qlora"}, "'finetuning_type' is 'qlora'"),
        ({"eval_split": 1.5}, "'eval_split' must be in [0, 1)"),
        ({"bf16": "yes"}, "'bf16' must be true, false or auto, got 'yes'"),
        ({"fp16": "on"}, "'fp16' must be true, false or auto, got 'on'"),
        ({"per_device_train_batch_size": 2.5}, "must be an integer"),
        ({"bf16": True, "fp16": True}, "at most one of 'bf16' and 'fp16'"),
        ({"max_prompt_length": 2048}, "must be smaller than 'max_length'"),
        ({"loss_type": "exo_pair"}, "exo_pair needs label_smoothing > 0"),
        ({"stage": "sft"}, "'stage: sft' is not supported"),
    ],
)
def test_bad_values_are_one_line_errors(raw, message):
    with pytest.raises(PreftuneError) as e:
        load_config({**BASE, **raw})
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_no_data_is_an_error():
    with pytest.raises(PreftuneError, match="no training data"):
        load_config({})


def test_errors_name_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_file: x.jsonl\nbeta_: 0.3\n")
    with pytest.raises(PreftuneError, match=r"c\.yaml: unknown key 'beta_'"):
        load_config(path)
    path.write_text("train_file: [x\n")
    with pytest.raises(PreftuneError, match=r"c\.yaml:\d+: invalid YAML"):
        load_config(path)


def test_overrides_are_yaml_values():
    cfg = load_config(BASE, ["beta=0.3", "loss_type=[sigmoid, sft]", "loss_weights=[1, 0.5]", "bf16=true"])
    assert cfg.loss.beta == 0.3 and cfg.loss_types == ["sigmoid", "sft"] and cfg.loss.loss_weights == [1.0, 0.5]
    assert cfg.training.bf16 is True
    assert load_config(BASE).training.bf16 == "auto" and load_config(BASE, ["bf16=auto"]).training.bf16 == "auto"
    with pytest.raises(PreftuneError, match="key=value"):
        load_config(BASE, ["beta"])


def test_llamafactory_keys_translate():
    cfg = load_config(
        {
            "stage": "dpo", "do_train": True, "dataset": "my_dpo_data", "dataset_dir": "data",
            "pref_beta": 0.2, "pref_loss": "ipo", "pref_ftx": 0.5, "cutoff_len": 512, "lora_rank": 64,
            "lora_target": "q_proj,v_proj", "template": "qwen", "learning_rate": "5.0e-6",
            "overwrite_cache": True, "preprocessing_num_workers": 16, "plot_loss": True,
        }
    )  # fmt: skip
    assert cfg.loss.beta == 0.2 and cfg.loss_types == ["ipo", "sft"] and cfg.loss.loss_weights == [1.0, 0.5]
    assert cfg.data.max_length == 512 and cfg.model.lora_r == 64
    assert cfg.model.lora_target == ["q_proj", "v_proj"] and cfg.training.learning_rate == 5e-6


# Every training config shipped in examples/ (examples/data/ holds data and builder specs,
# which test_template_builder.py loads).
SHIPPED_CONFIGS = sorted((REPO / "examples").glob("*.yaml"))


def test_shipped_configs_are_found():
    assert SHIPPED_CONFIGS, f"no YAML found in {REPO / 'examples'}"


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and ("train_file" in raw or "dataset" in raw), f"{path} is not a training config"
    load_config(path)


# Issue 14: ignored keys say so, strict values, paths with ~.


def test_each_ignored_key_warns_once_after_validation(capsys):
    from preftune.config import IGNORED_KEYS

    cfg = load_config({**BASE, "save_strategy": "steps", "flash_attn": "fa2", "do_train": True,
                       "preprocessing_num_workers": 16})  # fmt: skip
    lines = capsys.readouterr().err.splitlines()
    assert sorted(lines) == sorted(
        f"warning: '{key}' has no effect in preftune ({IGNORED_KEYS[key]}); ignored"
        for key in ("save_strategy", "flash_attn", "do_train", "preprocessing_num_workers")
    )
    load_config(cfg)  # a loaded config carries no ignored key: no second warning
    assert capsys.readouterr().err == ""
    with pytest.raises(PreftuneError, match="'beta' must be > 0"):
        load_config({**BASE, "save_strategy": "steps", "beta": -1})
    assert capsys.readouterr().err == ""  # an error is the only line
    assert "report_to" not in IGNORED_KEYS and "ddp_timeout" not in IGNORED_KEYS


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3", "mps"])
def test_devices_accepted(device):
    assert load_config({**BASE, "device": device}).training.device == device


@pytest.mark.parametrize("device", ["tpu", "cuda:", "cuda:x", "CPU", "cpu ", "xla:0", ""])
def test_devices_refused(device):
    with pytest.raises(PreftuneError, match="'device' is"):
        load_config({**BASE, "device": device})


def test_tilde_is_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("train_file: ~/data/pairs.jsonl\noutput_dir: ~/runs/a\neval_prompts: ~/p.txt\n")
    cfg = load_config("~/c.yaml")
    assert cfg.data.train_file == str(tmp_path / "data" / "pairs.jsonl")
    assert cfg.data.eval_prompts == str(tmp_path / "p.txt")
    assert cfg.training.output_dir == str(tmp_path / "runs" / "a")
    assert cfg.base_dir == str(tmp_path)


def test_values_within_range_still_load():
    cfg = load_config({**BASE, "seed": 2**64 - 1, "lora_dropout": 0.99, "loss_type": ["sigmoid", "sft"],
                       "loss_weights": [1, 0.001], "row_length_multiple": 1024, "max_length": 1024,
                       "learning_rate": "5e-6"})  # fmt: skip
    assert cfg.training.seed == 2**64 - 1 and cfg.loss.loss_weights == [1.0, 0.001]
    assert cfg.training.learning_rate == 5e-6
    cfg = load_config({**BASE, "pref_ftx": "5e-1"})  # YAML reads 5e-1 (no dot) as a string
    assert cfg.loss_types == ["sigmoid", "sft"] and cfg.loss.loss_weights == [1.0, 0.5]


def test_error_messages_stay_short():
    for raw in ({"system_prompt": ["x" * 10**6]}, {"lora_target": [[["a"] * 1000] * 1000]}, {"beta": "9" * 10**5}):
        with pytest.raises(PreftuneError) as e:
            load_config({**BASE, **raw})
        assert len(str(e.value)) < 300, str(e.value)[:300]
