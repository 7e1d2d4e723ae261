"""Every shipped config composes and validates; mistakes fail with the key named, never with a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launcher.config import ConfigError, register_configs, to_object
from launcher.validate import validate
from tests.conftest import ROOT, run_launcher

CONF = ROOT / "conf"
GROUPS = ["model", "template", "dataset", "optimizer", "backend", "finetune"]
register_configs()


def _compose(*overrides: str):
    """Compose like the CLI does, with Hydra's runtime info set so ${hydra:...} resolves."""
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(str(CONF), version_base="1.3"):
        HydraConfig.instance().set_config(compose("config", overrides=list(overrides), return_hydra_config=True))
        return compose("config", overrides=list(overrides))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_shipped_config_composes_and_validates(group: str, option: str) -> None:
    cfg = _compose(f"{group}={option}")
    obj = to_object(cfg)
    validate(obj)
    assert OmegaConf.select(cfg, group) is not None


def test_every_group_has_options() -> None:
    for g in GROUPS:
        assert _options(g), f"conf/{g}/ is empty"


def test_validate_gathers_every_problem() -> None:
    cfg = _compose()
    obj = to_object(cfg)
    obj.optimizer.lr = -1
    obj.train.grad_accum = 0
    obj.dataset.overlong = "chop"
    with pytest.raises(ConfigError) as err:
        validate(obj)
    msg = str(err.value)
    assert "optimizer.lr=-1" in msg and "train.grad_accum=0" in msg and "dataset.overlong='chop'" in msg


def test_lora_settings_are_checked_before_any_worker() -> None:
    obj = to_object(_compose("finetune=lora"))
    obj.finetune.lora_rank, obj.finetune.lora_dropout, obj.finetune.lora_target = 0, 1.5, []
    with pytest.raises(ConfigError) as err:
        validate(obj)
    msg = str(err.value)
    assert "finetune.lora_rank=0" in msg and "finetune.lora_dropout=1.5" in msg and "finetune.lora_target" in msg


@pytest.mark.parametrize("override,needle", [
    ("modle=x", "modle"),
    ("optimizer.lr=abc", "optimizer.lr"),
    ("model=nope", "tiny_llama"),  # Hydra lists the available options
    ("train.max_stpes=3", "max_stpes"),
    ("+train.foo=1", "Key 'foo' not in 'TrainerConfig'"),  # Hydra's append syntax: refused like a typo
    ("+bar=1", "Key 'bar' not in 'Config'"),
])
def test_cli_mistakes_name_the_key(override: str, needle: str, tmp_path: Path) -> None:
    r = run_launcher(override, f"output_dir={tmp_path}", timeout=120)
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_validation_error_is_one_paragraph_and_leaves_nothing(tmp_path: Path) -> None:
    r = run_launcher("optimizer.lr=-1", "train.micro_batch_size=0", f"output_dir={tmp_path}", timeout=120)
    assert r.returncode == 2
    assert "optimizer.lr=-1" in r.stderr and "train.micro_batch_size=0" in r.stderr
    assert "Traceback" not in r.stderr
    assert not any(tmp_path.rglob("config.yaml")), "a rejected run must not leave a run directory"


def test_optimizer_ranges_are_checked_before_any_worker() -> None:
    obj = to_object(_compose("optimizer.betas=[0.9,1.0]", "optimizer.eps=0", "optimizer.weight_decay=-0.1",
                             "optimizer.min_lr_ratio=-1", "optimizer.warmup_ratio=1.5", "optimizer.max_grad_norm=-1"))
    with pytest.raises(ConfigError) as err:
        validate(obj)
    msg = str(err.value)
    for key in ("optimizer.betas=[0.9, 1.0]", "optimizer.eps=0", "optimizer.weight_decay=-0.1",
                "optimizer.min_lr_ratio=-1", "optimizer.warmup_ratio=1.5", "optimizer.max_grad_norm=-1"):
        assert key in msg, (key, msg)
    validate(to_object(_compose("optimizer.betas=[0.0,0.95]", "optimizer.min_lr_ratio=1", "optimizer.weight_decay=0")))


def test_cfg_job_prints_the_composed_config() -> None:
    r = run_launcher("--cfg", "job", "optimizer.lr=0.5", timeout=120)
    assert r.returncode == 0, r.stderr
    composed = OmegaConf.create(r.stdout)
    assert composed.optimizer.lr == 0.5
    assert composed.backend.name == "deepspeed"


def test_dry_run_prints_the_deepspeed_command(tmp_path: Path) -> None:
    r = run_launcher("dry_run=true", f"output_dir={tmp_path}", "launcher.nproc_per_node=2", timeout=120)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.split()[0].endswith("deepspeed") and line.split()[1:3] == ["--num_gpus", "2"]
    assert "--module launcher.worker " in line
    assert not any(tmp_path.rglob("config.yaml")), "a dry run writes nothing"


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    """Fails before anything else, without asking the hub (whose client retries for ~30 s on a closed network)."""
    r = run_launcher("model=llama3_8b", f"output_dir={tmp_path / 'out'}", timeout=120,
                     env={"HF_HOME": str(tmp_path / "hf")})  # an empty cache, whatever this machine holds
    assert r.returncode == 2
    assert "meta-llama/Meta-Llama-3-8B" in r.stderr and "model.name_or_path" in r.stderr
    assert "Traceback" not in r.stderr
    assert "huggingface.co" not in r.stderr and "memory plan" not in r.stderr, r.stderr
    assert not any((tmp_path / "out").rglob("*")), "a rejected run leaves no run directory"


def test_a_missing_model_directory_is_named_without_traceback(tmp_path: Path) -> None:
    r = run_launcher("model.name_or_path=/nonexistent/model", "model.init=pretrained", f"output_dir={tmp_path}",
                     timeout=120)
    assert r.returncode == 2 and "model.name_or_path='/nonexistent/model': no such directory" in r.stderr
    assert "Traceback" not in r.stderr and not any(tmp_path.iterdir())
