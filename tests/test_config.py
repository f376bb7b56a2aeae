"""Config loading: includes, overrides, typed conversion, error messages, validation, CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from owl_jax.config import (
    Config,
    ConfigError,
    config_from_dict,
    dump_config,
    from_dict,
    load_config,
    to_dict,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---- includes ----------------------------------------------------------------------------------------


def test_base_chain_two_levels_later_overrides(tmp_path):
    write(tmp_path / "a.yaml", "model:\n  text:\n    num_layers: 8\n    vocab_size: 1000\ntraining:\n  steps: 5\n")
    write(tmp_path / "sub/b.yaml", "base: ../a.yaml\nmodel:\n  text:\n    num_layers: 6\ntraining:\n  seed: 7\n")
    cfg_path = write(tmp_path / "sub/c.yaml", "base: b.yaml\nmodel:\n  text:\n    num_layers: 4\n")
    cfg = load_config(cfg_path)
    assert cfg.model.text.num_layers == 4  # c over b over a
    assert cfg.model.text.vocab_size == 1000  # from a, kept through the dict merge
    assert cfg.training.steps == 5 and cfg.training.seed == 7
    assert cfg.model.text.hidden_size == 4096  # untouched default


def test_base_list_later_files_win_and_lists_replace(tmp_path):
    write(tmp_path / "x.yaml", "data:\n  train_paths: [a.tar, b.tar]\n  seq_len: 128\n")
    write(tmp_path / "y.yaml", "data:\n  train_paths: [c.tar]\n")
    cfg = load_config(write(tmp_path / "z.yaml", "base: [x.yaml, y.yaml]\ndata:\n  global_batch_size: 8\n"))
    assert cfg.data.train_paths == ["c.tar"]
    assert cfg.data.seq_len == 128
    assert cfg.data.global_batch_size == 8


def test_empty_section_in_child_keeps_base(tmp_path):
    write(tmp_path / "a.yaml", "training:\n  steps: 5\n")
    cfg = load_config(write(tmp_path / "b.yaml", "base: a.yaml\ntraining:\n"))
    assert cfg.training.steps == 5


def test_include_cycle(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as e:
        load_config(tmp_path / "a.yaml")
    assert "a.yaml" in str(e.value) and "b.yaml" in str(e.value)


def test_diamond_include_is_not_a_cycle(tmp_path):
    write(tmp_path / "root.yaml", "training:\n  steps: 2\n")
    write(tmp_path / "l.yaml", "base: root.yaml\n")
    write(tmp_path / "r.yaml", "base: root.yaml\n")
    assert load_config(write(tmp_path / "top.yaml", "base: [l.yaml, r.yaml]\n")).training.steps == 2


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found") as e:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(e.value)


def test_missing_base_names_including_file(tmp_path):
    path = write(tmp_path / "child.yaml", "base: gone.yaml\n")
    with pytest.raises(ConfigError, match="base file not found") as e:
        load_config(path)
    assert "gone.yaml" in str(e.value) and "child.yaml" in str(e.value)


def test_yaml_syntax_error_names_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "model:\n  text: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML") as e:
        load_config(path)
    assert "bad.yaml" in str(e.value)


def test_bad_base_value(tmp_path):
    with pytest.raises(ConfigError, match="'base'"):
        load_config(write(tmp_path / "a.yaml", "base: 3\n"))


# ---- overrides ---------------------------------------------------------------------------------------


def test_override_type_conversion(tmp_path):
    cfg = load_config(
        write(tmp_path / "c.yaml", ""),
        [
            "model.text.num_layers=4",
            "optimizer.learning_rate=1",  # int accepted for a float
            "optimizer.b2=1e-3",  # dot-less exponent is a float, not the string '1e-3'
            "model.scan_layers=true",
            "data.train_paths=[a.tar,b.tar]",
            "optimizer.lr_multipliers={vision_model: 0.1}",
            "model.lora.targets=['q_proj$']",
            "training.output_dir=runs/x=y",  # only the first '=' splits
        ],
    )
    assert cfg.model.text.num_layers == 4
    assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)
    assert cfg.optimizer.b2 == 1e-3
    assert cfg.model.scan_layers is True
    assert cfg.data.train_paths == ["a.tar", "b.tar"]
    assert cfg.optimizer.lr_multipliers == {"vision_model": 0.1}
    assert cfg.model.lora.targets == ["q_proj$"]
    assert cfg.training.output_dir == "runs/x=y"


def test_override_nested_rope_scaling_and_dict_key(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  text:\n    rope_scaling:\n      factor: 2.0\n")
    cfg = load_config(path, ["model.text.rope_scaling.type=llama3", "optimizer.lr_multipliers.abstractor=0.5"])
    assert cfg.model.text.rope_scaling.type == "llama3"
    assert cfg.model.text.rope_scaling.factor == 2.0
    assert cfg.optimizer.lr_multipliers == {"abstractor": 0.5}


def test_override_beats_file(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "training:\n  steps: 9\n"), ["training.steps=3"])
    assert cfg.training.steps == 3


@pytest.mark.parametrize("override", ["model.text.num_layers", "=4", "model..num_layers=4", "model.text.=4"])
def test_malformed_override(tmp_path, override):
    with pytest.raises(ConfigError, match="malformed override"):
        load_config(write(tmp_path / "c.yaml", ""), [override])


def test_override_bad_yaml_value(tmp_path):
    with pytest.raises(ConfigError, match="override"):
        load_config(write(tmp_path / "c.yaml", ""), ["data.train_paths=[a"])


# ---- unknown keys and types ----------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path / "c.yaml", "modle:\n  dtype: float32\n"))
    msg = str(e.value)
    assert "'modle'" in msg and "top level" in msg and "did you mean 'model'" in msg


def test_unknown_key_in_model_text(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path / "c.yaml", "model:\n  text:\n    hiden_size: 64\n"))
    msg = str(e.value)
    assert "'model.text.hiden_size'" in msg
    assert "section 'model.text'" in msg
    assert "did you mean 'hidden_size'" in msg
    assert "Valid keys:" in msg and "num_kv_heads" in msg


def test_unknown_key_via_override(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path / "c.yaml", ""), ["optimizer.learning_rat=1e-3"])
    msg = str(e.value)
    assert "'optimizer.learning_rat'" in msg and "section 'optimizer'" in msg and "'learning_rate'" in msg


def test_unknown_key_without_close_match(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path / "c.yaml", ""), ["training.zzzzzz=1"])
    assert "did you mean" not in str(e.value) and "Valid keys: stage" in str(e.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.text.num_layers=four", "model.text.num_layers: expected int, got str 'four'"),
        ("model.text.num_layers=2.5", "model.text.num_layers: expected int, got float 2.5"),
        ("model.text.num_layers=true", "model.text.num_layers: expected int, got bool True"),
        ("optimizer.learning_rate=fast", "optimizer.learning_rate: expected float, got str 'fast'"),
        ("model.scan_layers=1", "model.scan_layers: expected bool, got int 1"),
        ("data.train_paths=a.tar", "data.train_paths: expected list[str], got str 'a.tar'"),
        ("data.train_paths=[1]", "data.train_paths[0]: expected str, got int 1"),
        ("optimizer.lr_multipliers={vision: x}", "optimizer.lr_multipliers.vision: expected float, got str 'x'"),
        ("model.text=5", "section 'model.text' must be a mapping"),
    ],
)
def test_wrong_type_messages(tmp_path, override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path / "c.yaml", ""), [override])
    assert expected in str(e.value)


def test_section_given_scalar_in_file(tmp_path):
    with pytest.raises(ConfigError, match="section 'training' must be a mapping"):
        load_config(write(tmp_path / "c.yaml", "training: 3\n"))


def test_integral_float_accepted_for_int(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", ""), ["training.steps=10.0"])
    assert cfg.training.steps == 10 and isinstance(cfg.training.steps, int)


def test_from_dict_untyped_inner_list_kept():
    cfg = from_dict(Config, {"mesh": {"logical_axis_rules": [["batch", ["data", "fsdp"]], ["embed", None]]}})
    assert cfg.mesh.logical_axis_rules == [["batch", ["data", "fsdp"]], ["embed", None]]
    with pytest.raises(ConfigError, match=r"mesh.logical_axis_rules\[0\]: expected list"):
        from_dict(Config, {"mesh": {"logical_axis_rules": ["batch"]}})


# ---- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.text.num_heads=32", "model.text.num_kv_heads=5"], "divisible by num_kv_heads"),
        (["model.text.hidden_size=100", "model.text.num_heads=32"], "divisible by num_heads"),
        (["model.abstractor.hidden_size=512"], "must equal model.vision.hidden_size"),
        (["model.vision.image_size=200"], "divisible by patch_size"),
        (["model.dtype=float64"], "model.dtype"),
        (["model.param_dtype=int8"], "model.param_dtype"),
        (["model.remat_policy=some"], "model.remat_policy"),
        (["model.attention_impl=flash"], "model.attention_impl"),
        (["model.text.rope_scaling.type=yarn"], "model.text.rope_scaling.type"),
        (["training.stage=finetune"], "training.stage"),
        (["optimizer.schedule=step"], "optimizer.schedule"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "at most one of data/fsdp/tensor"),
        (["mesh.tensor=0"], "mesh.tensor must be >= 1"),
        (["model.lora.targets=['(']"], "invalid regular expression"),
        (["model.text.num_heads=0"], "model.text.num_heads must be >= 1"),
    ],
)
def test_validate_errors(tmp_path, overrides, expected):
    with pytest.raises(ConfigError, match="invalid config") as e:
        load_config(write(tmp_path / "c.yaml", ""), overrides)
    assert expected in str(e.value)


def test_validate_lists_every_problem():
    cfg = Config()
    cfg.model.dtype = "float64"
    cfg.training.stage = "nope"
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "model.dtype" in str(e.value) and "training.stage" in str(e.value)


def test_head_dim_set_allows_uneven_hidden(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", ""), ["model.text.hidden_size=100", "model.text.head_dim=32"])
    assert cfg.model.text.dim_per_head == 32


def test_defaults_are_valid():
    assert validate(Config()) == Config()


# ---- shipped configs -------------------------------------------------------------------------------


def test_owl_llama7b_config():
    m = load_config(CONFIGS / "model/owl_llama7b.yaml").model
    v, a, t = m.vision, m.abstractor, m.text
    assert (v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size) == (1024, 24, 16, 4096)
    assert (v.image_size, v.patch_size, v.layer_norm_eps) == (224, 14, 1e-6)
    assert (a.hidden_size, a.num_layers, a.num_heads, a.intermediate_size, a.num_queries) == (1024, 6, 16, 2816, 64)
    assert (a.norm_eps, a.layer_norm_eps, a.attention_dropout) == (1e-5, 1e-6, 0.1)
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads) == (32000, 4096, 11008, 32, 32)
    assert (t.rms_norm_eps, t.rope_theta, t.max_position_embeddings, t.tie_word_embeddings) == (1e-6, 1e4, 2048, False)
    assert (m.dtype, m.param_dtype, m.scan_layers, m.remat_policy) == ("bfloat16", "float32", True, "dots_no_batch")
    assert m.tokens_per_image == 65 and v.num_patches == 256


def test_tiny_config():
    m = load_config(CONFIGS / "model/tiny.yaml").model
    v, a, t = m.vision, m.abstractor, m.text
    assert (v.hidden_size, v.intermediate_size, v.num_layers, v.num_heads, v.image_size, v.patch_size) == (
        64, 256, 2, 4, 56, 14)
    assert (a.hidden_size, a.num_layers, a.num_heads, a.intermediate_size, a.num_queries) == (64, 2, 4, 96, 8)
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads) == (512, 96, 160, 2, 4)
    assert t.max_position_embeddings == 256
    assert (m.dtype, m.param_dtype, m.loss_chunk_size) == ("float32", "float32", 64)


def test_tiny_test_config():
    cfg = load_config(CONFIGS / "tiny_test.yaml")
    assert cfg.model.text.hidden_size == 96  # from the base
    assert (cfg.mesh.fsdp, cfg.training.steps, cfg.data.seq_len) == (-1, 3, 96)
    assert (cfg.data.global_batch_size, cfg.data.images_per_batch) == (8, 8)
    assert (cfg.data.kind, cfg.data.tokenizer) == ("captions", "toy:512")


# ---- dump / restore ------------------------------------------------------------------------------------


def test_dump_load_round_trip(tmp_path):
    cfg = load_config(
        CONFIGS / "tiny_test.yaml",
        ["optimizer.lr_multipliers={vision_model: 0.1}", "data.tokenizer='1e-4'", "model.lora.rank=4"],
    )
    text = dump_config(cfg)
    assert load_config(write(tmp_path / "dumped.yaml", text)) == cfg
    assert config_from_dict(yaml.safe_load(text)) == cfg
    assert config_from_dict(to_dict(cfg)) == cfg
    assert load_config(write(tmp_path / "default.yaml", dump_config(Config()))) == Config()


# ---- CLI -------------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "owl_jax.config", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_unknown_key_exits_2_without_traceback():
    proc = run_cli("--config", "configs/tiny_test.yaml", "model.text.hiden_size=8")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ")
    assert "model.text.hiden_size" in proc.stderr and "hidden_size" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_cli_prints_resolved_yaml():
    proc = run_cli("--config", "configs/tiny_test.yaml", "training.steps=7")
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert data["training"]["steps"] == 7
    assert data["model"]["text"]["hidden_size"] == 96


# ---- enumerated options: one list for validation, messages and docs ------------------------------------


@pytest.mark.parametrize("override, message", [
    ("data.kind=synthetic", "data.kind: 'synthetic' is not one of captions, instructions, text"),
    ("training.stage=instruct_lroa", "did you mean 'instruct_lora'?"),
    ("model.attention_impl=flash", "model.attention_impl: 'flash' is not one of xla, cudnn"),
    ("model.dtype=bf16", "model.dtype: 'bf16' is not one of float32, bfloat16, float16"),
    ("optimizer.schedule=cosin", "did you mean 'cosine'?"),
    ("data.sources=[{path: a.json, format: alpacca}]", "data.sources[0].format: 'alpacca' is not one of"),
    ("model.text.rope_scaling.type=yarn", "model.text.rope_scaling.type: 'yarn'"),
])
def test_enumerated_fields_are_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CONFIGS / "tiny_test.yaml", [override])


def test_accepted_choices_are_the_lists_the_code_uses():
    from data_pipelines.conversation import READERS
    from owl_jax.config import DataConfig, SourceConfig, TrainingConfig, enumerated_fields, field_choices
    from owl_jax.training.stages import STAGES
    assert set(field_choices(SourceConfig, "format")) == set(READERS)
    assert STAGES == field_choices(TrainingConfig, "stage")
    assert field_choices(DataConfig, "kind") == ("captions", "instructions", "text")
    keys = dict(enumerated_fields())
    assert keys["data.kind"] == ("captions", "instructions", "text") and "data.sources[].format" in keys
    for key, choices in keys.items():  # every default is one of its own choices
        assert choices[0] in choices and len(set(choices)) == len(choices), key


def test_config_cli_lists_the_choices():
    proc = run_cli("--config", "configs/tiny_test.yaml", "--choices")
    assert proc.returncode == 0
    assert "#   data.kind: captions | instructions | text" in proc.stdout


def test_every_init_key_has_an_importer():
    """A declared `init.*` key that nothing applies would be silently ignored: each one is in the table the
    trainer applies (`owl_jax.convert.IMPORTERS`), besides `from_checkpoint` (an owl-jax run)."""
    import dataclasses
    from owl_jax.config import InitConfig
    from owl_jax.convert import IMPORTERS
    declared = {f.name for f in dataclasses.fields(InitConfig)} - {"from_checkpoint"}
    assert declared == {key for key, _ in IMPORTERS}
