"""A refused run leaves nothing behind: every check that needs no tensor data (arguments, the
backend on this device, the config, the disk, the output folder) runs before the partial folder
is made, the refusal is one line with no traceback, and the same command, corrected, then simply
works. Each case runs the real CLI twice: refused, then corrected."""

from __future__ import annotations

import pytest
import torch
import yaml

from _checkpoints import make_tiny, write_config
from _cli import assert_refused, leftovers, run_cli

SHARD = ("--out-shard-size", "20KB", "--quiet")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refused")
    return make_tiny(tmp / "models")


def _good_config(path, models):
    base, experts = models
    return write_config(path, "ties", base, experts, {"density": 0.5})


def _config_text(path, models, mutate):
    base, experts = models
    cfg = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(e)} for e in experts],
           "parameters": {"density": 0.5}}
    text = mutate(cfg)
    path.write_text(text if isinstance(text, str) else yaml.safe_dump(cfg, sort_keys=False))
    return path


# case: (bad arguments, fragments of the refusal, corrected arguments); "{cfg}" is a good config
ARGUMENT_CASES = {
    "unknown_backend": (["--backend", "nope"], ["'nope' is not a backend"], []),
    "triton_without_gpu": (["--backend", "triton"], ["backend 'triton' cannot run this merge", "CUDA"], ["--backend", "auto"]),
    "cuda_extension_without_gpu": (["--backend", "cuda"], ["backend 'cuda' cannot run this merge"], []),
    "shard_size": (["--out-shard-size", "5XB"], ["cannot read '5XB' as a size"], ["--out-shard-size", "20KB"]),
    "memory_budget": (["--memory-budget=-1MB"], ["must be positive"], ["--memory-budget", "256MiB"]),
    "device": (["--device", "tpu"], ["--device 'tpu'"], ["--device", "cpu"]),
    "disk_margin": (["--disk-margin", "100000TB"], ["not enough free disk", "margin of 100000000.00 GB (--disk-margin)"], []),
}


@pytest.mark.parametrize("case", list(ARGUMENT_CASES))
def test_refused_arguments_leave_nothing_and_the_corrected_run_works(tmp_path, models, case):
    if case in ("triton_without_gpu", "cuda_extension_without_gpu") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the backend is available")
    bad, fragments, fixed = ARGUMENT_CASES[case]
    cfg = _good_config(tmp_path / "c.yml", models)
    out = tmp_path / "out"
    assert_refused(run_cli("merge", cfg, out, *SHARD, *bad), *fragments)
    assert not out.exists() and not leftovers(out)
    r = run_cli("merge", cfg, out, *SHARD, *fixed)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors.index.json").is_file() and not leftovers(out)


def test_dry_run_checks_the_disk_and_states_the_margin(tmp_path, models):
    cfg = _good_config(tmp_path / "c.yml", models)
    out = tmp_path / "out"
    r = run_cli("merge", cfg, out, "--dry-run", "--disk-margin", "100000TB")
    assert_refused(r, "not enough free disk", "(--disk-margin)", "free in")
    assert "peak memory" in r.stdout  # the plan is still shown
    r = run_cli("merge", cfg, out, "--dry-run")
    assert r.returncode == 0 and "disk:" in r.stdout and "margin of 67.1 MB" in r.stdout, r.stdout
    assert not out.exists() and not leftovers(out)


CONFIG_CASES = {
    "yaml_syntax": (lambda c: "merge_method: ties\nmodels: [a, b\nparameters: {", ["is not valid YAML", "line"]),
    "yaml_depth_bomb": (lambda c: "merge_method: ties\nmodels: " + "[" * 5000, ["nested too deeply"]),
    "deep_but_valid_yaml": (lambda c: "merge_method: ties\nmodels: " + "[" * 60 + "]" * 60, ["nested more than 32 levels"]),
    "unknown_top_level_key": (lambda c: c.update(merge_methd="ties"), ["unknown config key 'merge_methd'", "did you mean 'merge_method'"]),
    "unknown_parameter": (lambda c: c["parameters"].update(densty=0.5), ["unknown parameter 'densty'", "did you mean 'density'"]),
    "unknown_model_key": (lambda c: c["models"][0].update(paramters={}), ["did you mean 'parameters'"]),
    "method_needs_base": (lambda c: c.update(merge_method="sce", base_model=None), ["sce merges task vectors and needs base_model"]),
    "unknown_method": (lambda c: c.update(merge_method="tiess"), ["did you mean 'ties'"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_refused_configs_leave_nothing_and_the_corrected_run_works(tmp_path, models, case):
    mutate, fragments = CONFIG_CASES[case]
    out = tmp_path / "out"
    bad = _config_text(tmp_path / "c.yml", models, mutate)
    assert_refused(run_cli("merge", bad, out, *SHARD), *fragments)
    assert not out.exists() and not leftovers(out)
    good = _good_config(tmp_path / "c.yml", models)  # the same file, corrected
    r = run_cli("merge", good, out, *SHARD)
    assert r.returncode == 0, r.stderr


def test_existing_folder_refused_then_replaced_on_request(tmp_path, models):
    cfg = _good_config(tmp_path / "c.yml", models)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.bin").write_bytes(b"x")
    assert_refused(run_cli("merge", cfg, out, *SHARD), "already exists", "--overwrite")
    assert_refused(run_cli("merge", cfg, out, *SHARD, "--overwrite"), "--force-overwrite")
    assert (out / "old.bin").read_bytes() == b"x" and not leftovers(out)
    r = run_cli("merge", cfg, out, *SHARD, "--overwrite", "--force-overwrite")
    assert r.returncode == 0, r.stderr
    assert not (out / "old.bin").exists() and not leftovers(out)
