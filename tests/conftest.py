"""Shared fixtures. Tests never reach a hub: Hugging Face libraries are put offline (with a
throw-away cache) before anything imports them. GPU tests carry the ``gpu`` marker and are
deselected by setup.cfg's addopts; run them on a GPU machine with ``pytest -m gpu``. Without CUDA,
Triton kernels run in Triton's CPU interpreter (set before flexvlm_ray imports Triton)."""
import os
import tempfile

import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="flexvlm-hf-cache-"))
# remote code of test checkpoints (tests/fake_molmo_remote.py) is copied here, not under ~/.cache
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="flexvlm-hf-modules-"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402  (after the variables above: tqdm reads TQDM_DISABLE when it is imported)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BASE_SPEC = """
name: t
experiment: quickstart
model: {family: simulated, options: {decode_ms_per_token: 0.5}}
datasets: [{name: probe_grid, num_samples: 4, shards: 2}]
knobs: {top_k: [1, 8], active_blocks: [8, 16]}
measure: {warmup: 0}
"""


@pytest.fixture
def write_spec(tmp_path):
    def write(text: str = BASE_SPEC, name: str = "spec.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster with 2 logical GPUs for a test module (workers run on CPU)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_gpus=2, num_cpus=3, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """FLEXVLM_CACHE (importance scores of block_policy 'importance') under a throw-away folder for a
    whole test module; a module opts in with ``pytestmark = pytest.mark.usefixtures("module_cache")``."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FLEXVLM_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()
