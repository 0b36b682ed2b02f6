import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "LastFM" / "LastFM.txt").exists():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    from llmd4rec.testing import save_tiny_backbone

    return save_tiny_backbone(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tokenizer():
    from llmd4rec.testing import tiny_tokenizer

    return tiny_tokenizer()


# ---------------------------------------------------------------- the served model of the test_serve_* files

@pytest.fixture(scope="session")
def served_run(tmp_path_factory):
    """A tiny SASRec trained for one epoch on the synthetic data (about a second), loaded back as a run."""
    from _serve_helpers import MAX_LEN, N_ITEMS
    from llmd4rec.config import load_config
    from llmd4rec.loading import load_run
    from llmd4rec.recipes import train_crm

    root = tmp_path_factory.mktemp("serve")
    cfg = load_config(None, ["data.name=synthetic", "data.synthetic_users=200", f"data.synthetic_items={N_ITEMS}",
                             "crm_train.epochs=1", "crm.hidden=16", f"crm.max_len={MAX_LEN}",
                             "device=cpu", f"run_dir={root}", "run_name=sasrec"])
    return load_run(train_crm.run(cfg))


@pytest.fixture(scope="session")
def served_bundle(served_run, tmp_path_factory) -> Path:
    from llmd4rec.export import export_bundle

    return export_bundle(served_run.run_dir, tmp_path_factory.mktemp("bundles") / "crm")


@pytest.fixture(scope="session")
def served_client(served_bundle):
    from fastapi.testclient import TestClient

    from llmd4rec.serve import create_app

    return TestClient(create_app(served_bundle))
