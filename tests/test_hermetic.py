"""The suite is hermetic: every cache points into one temporary folder per session (tests/conftest.py), so what a
user ran before (``repalign rahf scit --help``, a converted embedded model, a datasets cache) or their token cannot
change a result, and the suite writes nothing into the user's caches."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CACHE_VARIABLES, SESSION_CACHE

ROOT = Path(__file__).resolve().parents[1]


def test_every_cache_is_the_sessions():
    import datasets
    import huggingface_hub.constants
    import transformers.utils.hub

    from hf_repalign.hub import hf_home
    from hf_repalign.models import embedded_model_cache_dir

    session = Path(SESSION_CACHE).resolve()
    for variable in CACHE_VARIABLES:
        assert session in Path(os.environ[variable]).resolve().parents, variable
    # The libraries read these once, at import: conftest must set them before anything imports huggingface_hub.
    for value in (huggingface_hub.constants.HF_HOME, huggingface_hub.constants.HF_HUB_CACHE,
                  huggingface_hub.constants.HF_TOKEN_PATH, transformers.utils.hub.HF_MODULES_CACHE,
                  datasets.config.HF_DATASETS_CACHE, hf_home(), embedded_model_cache_dir()):
        assert session in Path(value).resolve().parents, value
    assert huggingface_hub.constants.HF_HUB_OFFLINE and "HF_TOKEN" not in os.environ
    assert "HF_REPALIGN_DATA" not in os.environ  # the shipped sample, never the user's data folder


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_same_tests_pass_with_an_empty_and_a_used_cache(tmp_path):
    """The cache-sensitive tests run twice in fresh sessions: with an empty HF_HOME and with one a user filled
    (``repalign rahf scit --help`` run, a damaged embedded model, an old help description, a token); both pass,
    and the filled one is left as it was."""
    used = tmp_path / "used"
    (used / "hf_repalign" / "SmolLM2-135M-Instruct-v1").mkdir(parents=True)
    (used / "hf_repalign" / "SmolLM2-135M-Instruct-v1" / "config.json").write_text("{damaged")
    (used / "hf_repalign" / "cli-help").mkdir()
    (used / "hf_repalign" / "cli-help" / "rahf-scit-0123456789ab.json").write_text('{"parser": {}}')
    (used / "token").write_text("hf_not_a_real_token")
    env = dict(os.environ, HF_HOME=str(used), XDG_CACHE_HOME=str(tmp_path / "xdg"), OMP_NUM_THREADS="1")
    for variable in ("HF_HUB_CACHE", "HF_MODULES_CACHE", "HF_DATASETS_CACHE", "TRITON_CACHE_DIR"):
        env.pop(variable)
    subprocess.run([str(Path(sys.executable).parent / "repalign"), "rahf", "scit", "--help"], env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=300)
    before = _files(used)
    selected = ["tests/test_hermetic.py::test_every_cache_is_the_sessions",
                "tests/test_cli.py::test_help_flag_before_the_command_word_is_the_groups_help"]
    for home in (tmp_path / "empty", used):
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *selected],
                              cwd=ROOT, env=dict(env, HF_HOME=str(home)), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (home.name, done.stdout[-3000:], done.stderr[-3000:])
        assert f"{len(selected)} passed" in done.stdout, done.stdout[-1000:]
    assert _files(used) == before
    assert not (tmp_path / "empty").exists()
